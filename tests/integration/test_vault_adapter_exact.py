"""Every VaultAdapter operation against a real OpenBao, judged by what OpenBao holds
afterwards (policy text, token-role fields, the entity, the token by its accessor) and by
the exact error a failure becomes. One OpenBao for the module; each test names its own
identities so tests do not see each other's tokens."""

from __future__ import annotations

import logging
import socket
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from broker.adapters.vault import (
    FROZEN_POLICY,
    MANAGED_META_KEY,
    VaultAdapter,
    identity_hash,
    identity_role_name,
    lease_prefix,
)
from broker.core.models import MintedToken
from broker.core.scopemap import ScopeMap
from broker.core.spiffeid import SpiffeId
from broker.errors import VaultError, VaultPermissionError, VaultUnavailableError
from credbroker_dev.devstack import OpenBaoDev, free_port
from tests.integration.helpers import TcpProxy

ENRICH = "credbroker-enrichment"
FIRST = "credbroker-containment.isolate_host"  # the map's classes in order: its first
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


@pytest.fixture
def vault(own: OpenBaoDev, root: hvac.Client, smap: ScopeMap) -> VaultAdapter:
    adapter = VaultAdapter(addr=own.addr, token=own.root_token, timeout=5)
    adapter.sync_scope_map(smap)
    return adapter


def who() -> str:
    """A workload of this test only (its own entity and identity roles)."""
    return f"spiffe://example.org/agent/t{uuid.uuid4().hex[:10]}"


def mint(vault: VaultAdapter, smap: ScopeMap, spiffe_id: str, cls: str = "enrichment",
         ttl: int = 60, **meta: str) -> MintedToken:
    return vault.mint(cls=smap.classes[cls], spiffe_id=SpiffeId.parse(spiffe_id),
                      ttl_seconds=ttl, metadata=meta, now=NOW)


def token_data(root: hvac.Client, accessor: str) -> dict[str, object] | None:
    try:
        data: dict[str, object] = root.auth.token.lookup_accessor(accessor)["data"]
        return data
    except hvac.exceptions.InvalidRequest:
        return None


def policy(root: hvac.Client, name: str) -> str | None:
    try:
        rules: str = root.sys.read_policy(name)["data"]["rules"]
        return rules
    except hvac.exceptions.InvalidPath:
        return None


def role(root: hvac.Client, name: str) -> dict[str, object] | None:
    resp = root.read(f"auth/token/roles/{name}")
    return None if resp is None else dict(resp["data"])


def limited_token(root: hvac.Client, hcl: str) -> str:
    name = f"limited-{uuid.uuid4().hex[:8]}"
    root.sys.create_or_update_policy(name, hcl)
    token: str = root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]
    return token


# -- scope map -> Vault


def test_sync_writes_each_policy_and_role_exactly_then_nothing(
        own: OpenBaoDev, root: hvac.Client, smap: ScopeMap) -> None:
    fresh = OpenBaoDev(Path(tempfile.mkdtemp(prefix="cbva-sync-")))
    fresh.start()
    try:
        froot = hvac.Client(url=fresh.addr, token=fresh.root_token)
        adapter = VaultAdapter(addr=fresh.addr, token=fresh.root_token)
        names = tuple(c.vault_policy_name for c in smap.classes.values())
        first = adapter.sync_scope_map(smap)
        assert (first.policies_written, first.roles_written, first.unchanged,
                first.kept_frozen) == (names, names, (), ())
        for cls in smap.classes.values():
            assert policy(froot, cls.vault_policy_name) == cls.vault_policy_hcl()
            got = role(froot, cls.vault_policy_name)
            assert got is not None
            assert got["allowed_policies"] == [cls.vault_policy_name]
            assert got["disallowed_policies"] == ["root"]
            assert got["orphan"] is True and got["renewable"] is False
            assert got["token_explicit_max_ttl"] == cls.max_ttl_seconds
            assert got["token_no_default_policy"] is True
            assert got["token_type"] == "service"
            assert got["allowed_entity_aliases"] == ["spiffe://example.org/*"]
            assert not got["allowed_policies_glob"] and got["token_period"] == 0
        again = adapter.sync_scope_map(smap)
        assert (again.policies_written, again.roles_written, again.unchanged) == ((), (), names)
        # A role loosened behind the broker's back is written again, and only it.
        froot.write(f"auth/token/roles/{ENRICH}", allowed_policies=[ENRICH],
                    allowed_entity_aliases=["*"])
        drift = adapter.sync_scope_map(smap)
        assert drift.roles_written == (ENRICH,) and drift.policies_written == ()
        assert ENRICH not in drift.unchanged
        assert role(froot, ENRICH)["allowed_entity_aliases"] == [  # type: ignore[index]
            "spiffe://example.org/*"]
    finally:
        fresh.stop()


def test_a_frozen_class_is_written_frozen_and_kept_frozen_only_when_asked(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    real = smap.classes["enrichment"].vault_policy_hcl()
    try:
        r = vault.sync_scope_map(smap, frozenset({"enrichment"}))
        assert r.policies_written == (ENRICH,) and r.roles_written == ()
        assert ENRICH not in r.unchanged and len(r.unchanged) == 3
        assert policy(root, ENRICH) == FROZEN_POLICY
        kept = vault.sync_scope_map(smap, keep_frozen=True)
        assert kept.kept_frozen == ("enrichment",) and kept.policies_written == ()
        assert policy(root, ENRICH) == FROZEN_POLICY
        thawed = vault.sync_scope_map(smap)
        assert thawed.policies_written == (ENRICH,) and thawed.kept_frozen == ()
        assert policy(root, ENRICH) == real
    finally:
        root.sys.create_or_update_policy(ENRICH, real)


def test_identity_roles_follow_their_class_and_others_are_left_alone(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    me = who()
    mint(vault, smap, me)
    mine = identity_role_name(smap.classes["enrichment"], me)
    assert mine == f"{ENRICH}--{identity_hash(me)}" and len(identity_hash(me)) == 16
    got = role(root, mine)
    assert got is not None and got["path_suffix"] == identity_hash(me)
    assert got["allowed_policies"] == [ENRICH] and got["renewable"] is False
    # Roles that are not an identity's of a managed class, and one of a removed class.
    root.write("auth/token/roles/someone-else--abc", allowed_policies=["default"])
    root.write("auth/token/roles/credbroker-plain", allowed_policies=["default"])
    root.write("auth/token/roles/credbroker-gone--0123", allowed_policies=["default"])
    # The class role drifts: every identity role of the class is written again.
    root.write(f"auth/token/roles/{ENRICH}", allowed_policies=[ENRICH], renewable=True)
    root.write(f"auth/token/roles/{mine}", allowed_policies=[ENRICH], renewable=True,
               path_suffix=identity_hash(me))
    report = vault.sync_scope_map(smap)
    assert ENRICH in report.roles_written and mine in report.roles_written
    assert "credbroker-gone--0123" in report.roles_written
    assert None not in report.roles_written
    got = role(root, mine)
    assert got is not None and got["renewable"] is False
    assert got["path_suffix"] == identity_hash(me)
    assert got["allowed_entity_aliases"] == ["spiffe://example.org/*"]
    assert role(root, "credbroker-gone--0123") is None
    assert role(root, "someone-else--abc") is not None
    assert role(root, "credbroker-plain") is not None
    root.delete("auth/token/roles/someone-else--abc")
    root.delete("auth/token/roles/credbroker-plain")


def test_a_restarted_broker_mints_without_writing_roles_its_sync_found(
        own: OpenBaoDev, root: hvac.Client, smap: ScopeMap, vault: VaultAdapter) -> None:
    me = who()
    mint(vault, smap, me)
    mine = identity_role_name(smap.classes["enrichment"], me)
    link = TcpProxy(own.port)
    try:
        restarted = VaultAdapter(addr=link.addr, token=own.root_token)
        restarted.sync_scope_map(smap)  # lists the identity roles, finds them in line
        link.fail_answers(f"auth/token/roles/{mine}".encode())
        minted = mint(restarted, smap, me)  # one call: the role is not written again
        assert token_data(root, minted.accessor) is not None
        assert link.failed == 0
    finally:
        link.cut()


# -- credentials


def test_a_mint_is_exactly_the_class_bound_to_the_entity(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    me = who()
    assert vault.entity_of(me) is None  # no credential yet: no entity
    minted = mint(vault, smap, me, ttl=90, request_id="r-1", broker_instance="b-1")
    data = token_data(root, minted.accessor)
    assert data is not None
    assert data["policies"] == [ENRICH]
    assert data["meta"] == {MANAGED_META_KEY: "1", "spiffe_id": me,
                            "action_class": "enrichment", "request_id": "r-1",
                            "broker_instance": "b-1"}
    assert data["renewable"] is False
    assert data["explicit_max_ttl"] == 90
    assert 80 <= int(data["ttl"]) <= 90  # type: ignore[call-overload]
    assert data["display_name"] == "token-enrichment"
    enrich = smap.classes["enrichment"]
    assert data["path"] == f"auth/token/create/{identity_role_name(enrich, me)}/{identity_hash(me)}"
    assert minted.policies == (ENRICH,)
    assert minted.ttl_seconds == 90 and minted.expires_at == NOW + timedelta(seconds=90)
    assert minted.entity_id and minted.entity_id == data["entity_id"]
    assert minted.entity_id == vault.entity_of(me)
    assert minted.lease_prefix == lease_prefix(smap.classes["enrichment"], me) == \
        f"auth/token/create/{ENRICH}--{identity_hash(me)}/"
    entity = root.read(f"identity/entity/id/{minted.entity_id}")["data"]
    assert [a["name"] for a in entity["aliases"]] == [me]


def test_a_token_asks_for_its_class_policy_only_even_if_the_role_allows_more(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    me = who()
    mint(vault, smap, me)
    mine = identity_role_name(smap.classes["enrichment"], me)
    other = "credbroker-containment.isolate_host"
    root.write(f"auth/token/roles/{mine}", allowed_policies=[ENRICH, other],
               path_suffix=identity_hash(me))  # widened behind this process's back
    minted = mint(vault, smap, me)
    assert token_data(root, minted.accessor)["policies"] == [ENRICH]  # type: ignore[index]


def test_a_deleted_identity_role_is_written_again_by_the_next_mint(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    me = who()
    mint(vault, smap, me)
    mine = identity_role_name(smap.classes["enrichment"], me)
    root.delete(f"auth/token/roles/{mine}")
    minted = mint(vault, smap, me)
    assert token_data(root, minted.accessor)["meta"]["spiffe_id"] == me  # type: ignore[index]
    assert role(root, mine) is not None


def test_a_refused_mint_names_vault_and_writes_the_role_again_next_time(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap, own: OpenBaoDev) -> None:
    stranger = f"spiffe://other.org/agent/{uuid.uuid4().hex[:8]}"  # no role allows it
    with pytest.raises(VaultError) as err:
        mint(vault, smap, stranger)
    assert not isinstance(err.value, VaultUnavailableError)
    assert str(err.value).startswith(
        f"Vault at {own.addr} failed to mint a enrichment credential: ")
    theirs = identity_role_name(smap.classes["enrichment"], stranger)
    root.write(f"auth/token/roles/{theirs}", allowed_policies=[ENRICH],
               allowed_entity_aliases=["*"], path_suffix=identity_hash(stranger))
    with pytest.raises(VaultError):  # the role is written as the class says, again
        mint(vault, smap, stranger)
    assert role(root, theirs)["allowed_entity_aliases"] == [  # type: ignore[index]
        "spiffe://example.org/*"]


def test_lookup_gives_the_live_token_and_none_when_dead(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    me = who()
    minted = mint(vault, smap, me, ttl=120, k="v")
    info = vault.lookup_accessor(minted.accessor)
    assert info is not None
    assert info.accessor == minted.accessor and info.policies == (ENRICH,)
    assert info.metadata == {MANAGED_META_KEY: "1", "spiffe_id": me,
                             "action_class": "enrichment", "k": "v"}
    assert 110 <= info.ttl_seconds <= 120 and info.renewable is False
    assert info.entity_id == minted.entity_id
    assert vault.revoke_accessor(minted.accessor) is True
    assert token_data(root, minted.accessor) is None
    assert vault.lookup_accessor(minted.accessor) is None
    assert vault.revoke_accessor(minted.accessor) is False  # already dead
    assert vault.revoke_accessor(minted.accessor, check=False) is True  # not asked
    assert vault.lookup_accessor("no-such-accessor") is None


def test_revoke_prefix_ends_every_token_of_one_identity_and_class_only(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    me, other = who(), who()
    mine = [mint(vault, smap, me) for _ in range(3)]
    theirs = mint(vault, smap, other)
    vault.revoke_prefix(mine[0].lease_prefix)
    assert [token_data(root, m.accessor) for m in mine] == [None] * 3
    assert token_data(root, theirs.accessor) is not None


def test_disabling_the_entity_refuses_its_tokens_and_enabling_gives_them_back(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap, own: OpenBaoDev) -> None:
    me = who()
    minted = mint(vault, smap, me)
    root.secrets.kv.v2.create_or_update_secret(path="soc/enrichment/ti", secret={"k": "v"})
    as_it = hvac.Client(url=own.addr, token=minted.token)

    def works() -> bool:
        try:
            as_it.secrets.kv.v2.read_secret_version(path="soc/enrichment/ti",
                                                    raise_on_deleted_version=False)
            return True
        except hvac.exceptions.Forbidden:
            return False

    assert works()
    vault.set_entity_disabled(minted.entity_id, True)
    assert root.read(f"identity/entity/id/{minted.entity_id}")["data"]["disabled"] is True
    assert not works()
    vault.set_entity_disabled(minted.entity_id, False)
    assert root.read(f"identity/entity/id/{minted.entity_id}")["data"]["disabled"] is False
    assert works()


def test_class_policy_freeze_restore_and_emptying(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    cls = smap.classes["enrichment"]
    try:
        vault.freeze_class_policy(cls)
        assert policy(root, ENRICH) == FROZEN_POLICY
        vault.restore_class_policy(cls)
        assert policy(root, ENRICH) == cls.vault_policy_hcl()
        vault.empty_policy("credbroker-extra-a")
        assert policy(root, "credbroker-extra-a") == FROZEN_POLICY
        root.sys.create_or_update_policy("credbroker-extra-b", 'path "x" {capabilities=["read"]}')
        # Missing ones are skipped (not created, and the rest still done), frozen ones kept.
        emptied = vault.empty_policies(["credbroker-missing", "credbroker-extra-a",
                                        "credbroker-extra-b", ENRICH])
        assert emptied == ["credbroker-extra-b", ENRICH]
        assert policy(root, "credbroker-missing") is None
        assert policy(root, "credbroker-extra-b") == FROZEN_POLICY
        assert policy(root, ENRICH) == FROZEN_POLICY
    finally:
        vault.restore_class_policy(cls)


def test_accessors_listed_and_only_this_instances_tokens_are_managed(
        vault: VaultAdapter, root: hvac.Client, smap: ScopeMap) -> None:
    instance = uuid.uuid4().hex
    ours = mint(vault, smap, who(), broker_instance=instance)
    skipped = mint(vault, smap, who(), broker_instance=instance)
    other_broker = mint(vault, smap, who(), broker_instance="another")
    plain = root.auth.token.create(policies=["default"], ttl="10m",
                                   meta={"broker_instance": instance})["auth"]
    listed = vault.list_accessors()
    assert {ours.accessor, skipped.accessor, other_broker.accessor,
            plain["accessor"]} <= listed
    assert all(isinstance(a, str) and len(a) > 10 for a in listed)
    foreign = {"gone-long-ago"}
    found = vault.managed_accessors(instance, skip={skipped.accessor}, foreign=foreign)
    assert set(found) == {ours.accessor}
    assert found[ours.accessor]["broker_instance"] == instance
    assert found[ours.accessor][MANAGED_META_KEY] == "1"
    assert "gone-long-ago" not in foreign  # forgotten: Vault no longer lists it
    assert {other_broker.accessor, plain["accessor"]} <= foreign
    assert ours.accessor not in foreign and skipped.accessor not in foreign
    # A known foreign accessor is not looked up again, whatever it is.
    assert set(vault.managed_accessors(instance, foreign={ours.accessor})) == {skipped.accessor}
    assert set(vault.managed_accessors(instance)) == {ours.accessor, skipped.accessor}


# -- the broker's own token


def test_capabilities_of_root_a_limited_and_a_revoked_token(
        own: OpenBaoDev, root: hvac.Client) -> None:
    assert VaultAdapter(addr=own.addr, token=own.root_token).check_capabilities() == []
    token = limited_token(root, 'path "sys/policies/acl/*" {capabilities=["read"]}\n'
                                'path "auth/token/*" {capabilities=["update","list","sudo",'
                                '"create","read","delete"]}\n'
                                'path "sys/leases/*" {capabilities=["update","sudo"]}\n'
                                'path "identity/*" {capabilities=["update"]}\n')
    limited = VaultAdapter(addr=own.addr, token=token)
    assert limited.check_capabilities() == [
        "the broker's Vault token lacks create,update on sys/policies/acl/credbroker-probe "
        "(writing class policies)",
        "the broker's Vault token lacks read on sys/auth (finding the token auth mount)",
    ]
    root.auth.token.revoke(token)
    assert limited.check_capabilities() == [
        f"Vault at {own.addr} refuses the broker's token itself (it is revoked or expired, "
        "or lacks sys/capabilities-self): give the broker a valid token"]


def test_a_refusal_of_the_brokers_own_token_names_the_operation(
        own: OpenBaoDev, root: hvac.Client, smap: ScopeMap) -> None:
    token = limited_token(root, 'path "sys/policy/*" {capabilities=["read"]}\n'
                                'path "auth/token/lookup-accessor" {capabilities=["update"]}\n')
    limited = VaultAdapter(addr=own.addr, token=token)
    hint = ("the broker's own Vault token is revoked, expired or lacks a capability "
            "(operator: give the broker a valid token with the policy in the README, "
            "Security model)")
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: limited.sync_scope_map(smap), f"read token role {FIRST}"),
        (lambda: limited.set_entity_disabled("e-1", True), "disable a workload's entity"),
        (lambda: limited.set_entity_disabled("e-1", False), "re-enable a workload's entity"),
        (lambda: limited.freeze_class_policy(smap.classes["enrichment"]),
         f"freeze policy {ENRICH}"),
        (lambda: limited.list_accessors(), "list token accessors"),
        (lambda: limited.entity_of("spiffe://example.org/x"), "look up a workload's entity"),
        (lambda: limited.revoke_accessor("acc", check=False), "revoke a credential"),
    ]
    for call, what in cases:
        with pytest.raises(VaultPermissionError) as err:
            call()
        assert str(err.value) == (f"Vault at {own.addr} refused the broker permission to "
                                  f"{what}: {hint}")
    # The look-up's 403 is not read as "gone" while the token itself lacks the capability.
    nolookup = VaultAdapter(addr=own.addr, token=limited_token(
        root, 'path "sys/capabilities-self" {capabilities=["update"]}\n'))
    assert nolookup.check_capabilities() != []
    with pytest.raises(VaultPermissionError):
        nolookup.lookup_accessor("acc")


def test_unreachable_vault_names_the_operation_and_what_to_do(smap: ScopeMap) -> None:
    addr = f"http://127.0.0.1:{free_port()}"
    down = VaultAdapter(addr=addr, token="t", timeout=2)
    cases: list[tuple[Callable[[], object], str]] = [
        (lambda: down.sync_scope_map(smap), f"read policy {FIRST}"),
        (lambda: down.check_capabilities(), "check its own capabilities"),
        (lambda: down.empty_policies(["credbroker-x"]), "read policy credbroker-x"),
        (lambda: down.health(), "check its health"),
        (lambda: down.revoke_prefix("auth/token/create/x/"),
         "revoke an identity's credentials by prefix"),
    ]
    for call, what in cases:
        with pytest.raises(VaultUnavailableError) as err:
            call()
        assert str(err.value) == (f"Vault at {addr} is unreachable while trying to {what} "
                                  "(ConnectionError); check that Vault/OpenBao is running and "
                                  "reachable")


def test_a_bad_gateway_and_a_silent_vault(own: OpenBaoDev, smap: ScopeMap) -> None:
    link = TcpProxy(own.port)
    try:
        vault = VaultAdapter(addr=link.addr, token=own.root_token, timeout=0.5)
        link.fail_answers()
        with pytest.raises(VaultUnavailableError) as err:
            vault.restore_class_policy(smap.classes["enrichment"])
        assert str(err.value).startswith(f"Vault at {link.addr} is not serving (")
        assert str(err.value).endswith(f") while trying to restore policy {ENRICH}; it may "
                                       "be sealed or restarting")
        link.stop_failing()
        link.blackhole()
        with pytest.raises(VaultUnavailableError) as err:
            vault.lookup_accessor("acc")
        assert str(err.value) == (f"Vault at {link.addr} is unreachable while trying to look "
                                  "up a credential (ReadTimeout); check that Vault/OpenBao is "
                                  "running and reachable")
    finally:
        link.cut()


def _answering(answer: bytes) -> Iterator[str]:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(8)

    def run() -> None:
        while True:
            try:
                conn, _ = lst.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(65536)
                    conn.sendall(answer)
                except OSError:
                    pass

    threading.Thread(target=run, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{lst.getsockname()[1]}"
    finally:
        lst.close()


def test_a_lost_or_unreadable_answer_says_so() -> None:
    cut = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n40\r\n{\"data\": {\"keys\": [\"x")
    for addr in _answering(cut):
        with pytest.raises(VaultUnavailableError) as err:
            VaultAdapter(addr=addr, token="t", timeout=2).list_accessors()
        assert str(err.value) == (f"Vault's answer at {addr} was lost while trying to list "
                                  "token accessors (ChunkedEncodingError); check the network "
                                  "path to Vault/OpenBao")
    keys = b'{"data": {"keys": "abc"}}'
    wrong = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
             + str(len(keys)).encode() + b"\r\nConnection: close\r\n\r\n" + keys)
    for addr in _answering(wrong):
        with pytest.raises(VaultUnavailableError) as err:
            VaultAdapter(addr=addr, token="t", timeout=2).list_accessors()
        assert str(err.value) == (f"Vault at {addr} gave an answer the broker cannot read "
                                  "while trying to list token accessors (TypeError); is "
                                  "something other than Vault answering?")


def test_a_sealed_vault_is_unavailable(short_tmp: Path) -> None:
    sealed = OpenBaoDev(Path(tempfile.mkdtemp(prefix="cbva-seal-", dir=short_tmp)))
    sealed.start()
    try:
        adapter = VaultAdapter(addr=sealed.addr, token=sealed.root_token)
        adapter.health()
        hvac.Client(url=sealed.addr, token=sealed.root_token).sys.seal()
        with pytest.raises(VaultUnavailableError) as err:
            adapter.health()
        assert str(err.value) == f"Vault at {sealed.addr} is sealed"
    finally:
        sealed.stop()


def test_the_token_file_is_followed(own: OpenBaoDev, root: hvac.Client, tmp_path: Path,
                                    caplog: pytest.LogCaptureFixture) -> None:
    weak = limited_token(root, 'path "sys/capabilities-self" {capabilities=["update"]}\n')
    path = tmp_path / "token"
    path.write_text(own.root_token + "\n")
    adapter = VaultAdapter(addr=own.addr, token="not-a-token", token_file=path)
    assert adapter.check_capabilities() == []  # read from the file, not the flag
    path.write_text(weak + "\n\n")  # an agent sink rewrote it (another size)
    assert adapter.check_capabilities() != []
    path.write_text("")  # a sink mid-write: the token in use stays, with a warning
    with caplog.at_level(logging.WARNING, logger="broker.adapters.vault"):
        assert adapter.check_capabilities() != []
    assert [r.getMessage() for r in caplog.records] == [
        f"the Vault token file {path} is empty; the token in use stays"]
    caplog.clear()
    path.write_text(own.root_token)
    assert adapter.check_capabilities() == []
    path.unlink()
    with caplog.at_level(logging.WARNING, logger="broker.adapters.vault"):
        assert adapter.check_capabilities() == []  # the last token read goes on
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot re-read the Vault token file {path}: No such file or directory"]
    caplog.clear()
    path.write_bytes(b"\xff\xfe" + weak.encode())  # not text: the token in use stays
    with caplog.at_level(logging.WARNING, logger="broker.adapters.vault"):
        assert adapter.check_capabilities() == []
        assert adapter.check_capabilities() == []  # warned once for that version of the file
    assert [r.getMessage() for r in caplog.records] == [
        f"the Vault token file {path} is not text (not UTF-8): the token read before stays "
        "in use; check what writes that file (a Vault Agent sink writes the token as text)"]
    path.write_text(weak)
    assert adapter.check_capabilities() != []
