"""`credbroker login/logout`: the cached ID token, and the device flow against the real dev
identity provider served over HTTP on loopback."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from broker.adapters.approvers import ApproverConfig, ApproverTokenError, DevIssuer, OidcVerifier
from broker.app.people import (
    PERSON_MD_KEY,
    NotResponderError,
    PersonRequiredError,
    ResponderGate,
    person_token,
)
from broker.cli.login import LoginError, TokenCache, config_dir, device_login, discover
from broker.cli.main import main
from broker.errors import InvalidRequestError
from credbroker_dev.devidp import DevIdp


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[DevIdp]:
    server = DevIdp(tmp_path, interval=0.05)
    server.start()
    yield server
    server.stop()


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# -- the cache

def test_config_dir_follows_xdg_else_home(tmp_path: Path) -> None:
    assert config_dir({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "credbroker"
    assert config_dir({"XDG_CONFIG_HOME": "relative"}) == Path.home() / ".config/credbroker"
    assert config_dir({}) == Path.home() / ".config" / "credbroker"


def test_cache_is_0600_in_a_0700_directory_and_logout_removes_it(tmp_path: Path) -> None:
    issuer = DevIssuer(tmp_path)
    token = issuer.id_token("alice@example.org", ttl=600)
    d = tmp_path / "cfg" / "credbroker"
    d.mkdir(parents=True, mode=0o755)  # an existing, looser directory is tightened
    cache = TokenCache(d)
    login = cache.save(token, issuer=DevIssuer.ISSUER)
    assert login.subject == "alice@example.org" and "responders" in login.groups
    assert _mode(d) == 0o700 and _mode(cache.path) == 0o600
    leaked = token in repr(login)  # (compared apart: a failing assert would print it)
    assert not leaked, "the ID token is in the repr"
    assert cache.valid_token(datetime.now(UTC)) == token
    assert [p.name for p in d.iterdir()] == ["login.json"]  # no temporary file left
    assert cache.clear() is not None and not cache.path.exists()
    assert cache.valid_token(datetime.now(UTC)) == ""  # logged out: no token, no error
    assert cache.clear() is None


def test_an_expired_login_says_to_log_in_again(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path / "c")
    token = DevIssuer(tmp_path).id_token("dave@example.org", ttl=60)
    cache.save(token, issuer=DevIssuer.ISSUER)
    with pytest.raises(LoginError) as err:
        cache.valid_token(datetime.now(UTC) + timedelta(minutes=5))
    text = str(err.value)
    assert "your login as dave@example.org expired at" in text
    assert "run `credbroker login` again" in text
    leaked = token in text
    assert not leaked, "the ID token is in the message"


def test_a_login_readable_by_others_is_refused(tmp_path: Path) -> None:
    cache = TokenCache(tmp_path / "c")
    cache.save(DevIssuer(tmp_path).id_token("alice@example.org"), issuer=DevIssuer.ISSUER)
    os.chmod(cache.path, 0o644)
    with pytest.raises(LoginError, match="readable by others"):
        cache.valid_token(datetime.now(UTC))
    cache.path.write_text("{not json")
    os.chmod(cache.path, 0o600)
    with pytest.raises(LoginError, match="unreadable; run `credbroker login` again"):
        cache.load()


# -- the device flow against the dev IdP over HTTP

def test_discovery_document(idp: DevIdp) -> None:
    doc = discover(idp.issuer)
    assert doc["issuer"] == idp.issuer
    assert doc["device_authorization_endpoint"] == f"{idp.issuer}/device_authorization"
    with urllib.request.urlopen(doc["jwks_uri"], timeout=5) as r:  # noqa: S310 - loopback
        assert json.loads(r.read())["keys"][0]["kid"] == idp.signer.kid


def test_device_flow_with_login_hint_gives_a_token_the_broker_accepts(idp: DevIdp) -> None:
    token = device_login(idp.issuer, "credbroker-approvals", login_hint="alice@example.org",
                         announce=lambda _: pytest.fail("a hinted dev login asks nobody"))
    person = OidcVerifier(ApproverConfig(issuer=idp.issuer, jwks_path=idp.jwks_path)
                          ).verify(token)
    assert person.subject == "alice@example.org" and "responders" in person.groups


def _approve_on_the_page(idp: DevIdp, shown: list[str], user: str, action: str) -> None:
    while not shown:
        time.sleep(0.01)
    code = shown[0].split("enter the code ")[1].split()[0]
    assert f"{idp.issuer}/device?user_code={code}" in shown[0]
    with urllib.request.urlopen(f"{idp.issuer}/device?user_code={code}",  # noqa: S310
                                timeout=5) as r:
        assert "carol@example.org" in r.read().decode()  # the page offers the dev users
    form = urllib.parse.urlencode({"user_code": code, "user": user, "action": action})
    with urllib.request.urlopen(f"{idp.issuer}/device", data=form.encode(),  # noqa: S310
                                timeout=5) as r:
        assert r.status == 200


def test_device_flow_waits_until_the_person_signs_in_on_the_page(idp: DevIdp) -> None:
    shown: list[str] = []
    page = threading.Thread(target=_approve_on_the_page,
                            args=(idp, shown, "carol@example.org", "approve"))
    page.start()
    token = device_login(idp.issuer, "credbroker-approvals", announce=shown.append)
    page.join(5)
    person = OidcVerifier(ApproverConfig(issuer=idp.issuer, jwks_path=idp.jwks_path)
                          ).verify(token)
    assert person.subject == "carol@example.org" and person.groups == ("iam-leads",)


def test_a_denied_sign_in_is_refused(idp: DevIdp) -> None:
    shown: list[str] = []
    page = threading.Thread(target=_approve_on_the_page,
                            args=(idp, shown, "alice@example.org", "deny"))
    page.start()
    with pytest.raises(LoginError, match="denied"):
        device_login(idp.issuer, "credbroker-approvals", announce=shown.append)
    page.join(5)


def test_device_code_is_single_use_and_expires(tmp_path: Path) -> None:
    idp = DevIdp(tmp_path, code_ttl=1)
    form = {"client_id": "credbroker-approvals", "scope": "openid"}
    _, auth = idp.authorize_device({**form, "login_hint": "bob@example.org"})
    poll = {"grant_type": "urn:ietf:params:oauth:grant-type:device_code",
            "client_id": "credbroker-approvals", "device_code": auth["device_code"]}
    assert idp.token(poll)[0] == 200
    assert idp.token(poll)[1]["error"] == "invalid_grant"  # used
    _, auth = idp.authorize_device(form)
    poll["device_code"] = auth["device_code"]
    assert idp.token(poll)[1]["error"] == "authorization_pending"
    assert idp.token(poll)[1]["error"] == "slow_down"  # polled again at once
    time.sleep(1.1)
    assert idp.token(poll)[1]["error"] == "expired_token"
    assert idp.authorize_device({**form, "client_id": "other"})[1]["error"] == "invalid_client"
    assert idp.authorize_device({**form, "scope": "email"})[1]["error"] == "invalid_scope"
    status, body = idp.authorize_device({**form, "login_hint": "mallory@example.org"})
    assert status == 400 and "knows alice@example.org" in body["error_description"]


def test_login_refuses_plain_http_and_a_lying_issuer(idp: DevIdp) -> None:
    with pytest.raises(LoginError, match="must be an https URL"):
        discover("http://idp.example.org")
    wrong = idp.issuer.replace("127.0.0.1", "localhost")  # serves a doc naming another issuer
    with pytest.raises(LoginError, match="refusing it"):
        discover(wrong)
    with pytest.raises(LoginError, match="unreachable"):
        discover("http://127.0.0.1:1")


def _dev_dir(tmp_path: Path, idp: DevIdp) -> Path:
    d = tmp_path / "dev"
    d.mkdir()
    (d / "dev.json").write_text(json.dumps({"dev_idp": {
        "issuer": idp.issuer, "url": idp.issuer, "client_id": idp.client_id}}))
    return d


def test_login_and_logout_commands(idp: DevIdp, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    dev = _dev_dir(tmp_path, idp)
    assert main(["login", "--dev", str(dev), "--as", "dave@example.org"]) == 0
    out = capsys.readouterr().out
    cache = TokenCache.from_env(os.environ)
    assert "logged in as dave@example.org (groups: soc-analysts, responders)" in out
    assert str(cache.path) in out and _mode(cache.path) == 0o600
    token = cache.valid_token(datetime.now(UTC))
    assert token
    leaked = token in out
    assert not leaked, "the ID token was printed"
    assert main(["logout"]) == 0
    assert "logged out (dave@example.org)" in capsys.readouterr().out
    assert not cache.path.exists()
    assert main(["logout"]) == 0 and "not logged in" in capsys.readouterr().out
    assert main(["login", "--as", "dave@example.org"]) == 2
    assert "--as USER only works with --dev" in capsys.readouterr().err
    assert main(["login"]) == 2 and "--issuer URL" in capsys.readouterr().err
    assert main(["login", "--dev", str(dev), "--as", "mallory@example.org"]) == 3
    assert "unknown dev user 'mallory@example.org'" in capsys.readouterr().err


def test_an_expired_login_stops_an_act_before_the_broker_is_asked(idp: DevIdp) -> None:
    TokenCache.from_env(os.environ).save(
        idp.signer.id_token("alice@example.org", audience=idp.client_id, ttl=1),
        issuer=idp.issuer)
    from broker.cli.responder import person_token as cli_person_token

    class Args:
        as_user = None
        id_token_file = None
        dev = None

    with pytest.raises(LoginError, match="run `credbroker login` again"):
        cli_person_token(Args())  # type: ignore[arg-type]


# -- the broker's side: who an act is recorded as

class FakeContext:
    def __init__(self, *md: tuple[str, str]) -> None:
        self._md = md

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md


def test_person_token_metadata_is_checked() -> None:
    assert person_token(FakeContext()) == ""  # type: ignore[arg-type]
    assert person_token(FakeContext((PERSON_MD_KEY, "Bearer abc"))) == "abc"  # type: ignore[arg-type]
    for md in ([(PERSON_MD_KEY, "abc")], [(PERSON_MD_KEY, "Bearer ")],
               [(PERSON_MD_KEY, "Bearer a"), (PERSON_MD_KEY, "Bearer b")],
               [(PERSON_MD_KEY, "Bearer " + "x" * 20000)]):
        with pytest.raises(InvalidRequestError) as err:
            person_token(FakeContext(*md))  # type: ignore[arg-type]
        assert "x" * 100 not in str(err.value)


def test_responder_gate(tmp_path: Path) -> None:
    issuer = DevIssuer(tmp_path)
    gate = ResponderGate(verifier=OidcVerifier(ApproverConfig(
        issuer=DevIssuer.ISSUER, jwks_path=issuer.jwks_path)), groups=["responders"],
        automation=["spiffe://example.org/soar"])

    def ctx(token: str = "") -> grpc.ServicerContext:
        return FakeContext(*([(PERSON_MD_KEY, f"Bearer {token}")] if token else []))

    admin = "spiffe://example.org/credbroker/admin"
    alice = gate.actor(ctx(issuer.id_token("alice@example.org")), admin, "freeze")
    assert (alice.by, alice.kind) == ("alice@example.org", "person")
    assert alice.audit() == {"kind": "person", "client": admin, "issuer": DevIssuer.ISSUER,
                             "groups": ["ir-leads", "responders"]}
    with pytest.raises(NotResponderError, match="only members of responders may revoke"):
        gate.actor(ctx(issuer.id_token("carol@example.org")), admin, "freeze")
    with pytest.raises(PersonRequiredError, match="run `credbroker login`"):
        gate.actor(ctx(), admin, "freeze")
    expired = issuer.id_token("alice@example.org", ttl=-60)
    with pytest.raises(ApproverTokenError, match="expired; run `credbroker login` again"):
        gate.actor(ctx(expired), admin, "freeze")
    (tmp_path / "x").mkdir()
    other = DevIssuer(tmp_path / "x")  # another key: a forged token
    with pytest.raises(ApproverTokenError, match="credbroker login"):
        gate.actor(ctx(other.id_token("alice@example.org")), admin, "freeze")
    bot = gate.actor(ctx(), "spiffe://example.org/soar", "freeze")
    assert (bot.by, bot.kind) == ("automation:spiffe://example.org/soar", "automation")
