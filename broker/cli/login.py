"""``credbroker login | logout``: a person's OIDC ID token for the responder commands.

``login`` runs the OAuth 2.0 device authorization grant (RFC 8628) against the
OIDC provider named by ``--issuer`` (found through its discovery document,
``/.well-known/openid-configuration``) or, with ``--dev DIR``, the dev stack's
identity provider. It works over SSH and needs no browser on this machine:
it prints a URL and a code, the person signs in there, and the CLI polls the
token endpoint for the ID token.

The ID token is cached in ``$XDG_CONFIG_HOME/credbroker/login.json`` (else
``~/.config/credbroker/login.json``; directory 0700, file 0600, written
atomically) until it expires; nothing else of the exchange is kept (no access
or refresh token). The responder commands send it with every act (revoke,
freeze, unfreeze, approve, deny, sign-off) in the gRPC metadata key
``authorization-person``. ``logout`` deletes the file. The token is a secret:
it is never printed or logged.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt

from broker.errors import ConfigError, IdentityError

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_CLIENT_ID = "credbroker-approvals"
DEFAULT_SCOPE = "openid email groups"
CACHE_NAME = "login.json"
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LoginError(IdentityError):
    """Logging in failed, or the cached login cannot be used (the message says what to do)."""

    code = "login"


def config_dir(env: Mapping[str, str]) -> Path:
    """``$XDG_CONFIG_HOME/credbroker`` (when absolute, as the XDG spec says), else
    ``~/.config/credbroker``."""
    xdg = env.get("XDG_CONFIG_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "credbroker"


@dataclass(frozen=True, slots=True, kw_only=True)
class CachedLogin:
    issuer: str
    subject: str
    groups: tuple[str, ...]
    expires_at: datetime
    id_token: str  # secret: never print it

    def __repr__(self) -> str:
        return (f"CachedLogin(issuer={self.issuer!r}, subject={self.subject!r}, "
                f"expires_at={self.expires_at.isoformat()}, id_token=<redacted>)")


def claims_of(id_token: str) -> dict[str, Any]:
    """The token's claims, unverified (the broker verifies; this is for display and expiry).

    Raises: LoginError (not a JWT).
    """
    try:
        claims: dict[str, Any] = jwt.decode(id_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        raise LoginError("the identity provider's answer holds no usable ID token (not a "
                         "JWT)") from None
    return claims


def _subject(claims: Mapping[str, Any]) -> str:
    email = claims.get("email") if claims.get("email_verified") is True else None
    return str(email or claims.get("sub", "?"))


class TokenCache:
    """The cached login: one file, 0600, in a 0700 directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / CACHE_NAME

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> TokenCache:
        return cls(config_dir(env))

    def save(self, id_token: str, *, issuer: str) -> CachedLogin:
        """Write the login atomically with mode 0600 (directory 0700).

        Raises: LoginError (the token has no expiry), OSError (cannot write).
        """
        claims = claims_of(id_token)
        if not isinstance(claims.get("exp"), int | float):
            raise LoginError("the ID token has no expiry (exp); refusing to cache it")
        login = CachedLogin(issuer=issuer, subject=_subject(claims),
                            groups=tuple(map(str, claims.get("groups") or [])),
                            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
                            id_token=id_token)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)
        fd, tmp = tempfile.mkstemp(prefix=".login-", dir=self.directory)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"issuer": issuer, "subject": login.subject,
                           "groups": list(login.groups),
                           "expires_at": login.expires_at.isoformat(),
                           "id_token": id_token}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return login

    def load(self) -> CachedLogin | None:
        """The cached login, or None when there is none. Does not judge expiry.

        Raises: LoginError (readable by others, or unreadable/corrupt: log in again).
        """
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise LoginError(f"cannot read your login {self.path}: {exc.strerror}") from None
        if st.st_mode & 0o077:
            raise LoginError(f"your login {self.path} is readable by others (mode "
                             f"{st.st_mode & 0o777:o}); it may have leaked: run `credbroker "
                             "logout`, then `credbroker login`")
        try:
            data = json.loads(self.path.read_text())
            return CachedLogin(issuer=str(data["issuer"]), subject=str(data["subject"]),
                               groups=tuple(map(str, data.get("groups") or [])),
                               expires_at=datetime.fromisoformat(data["expires_at"]),
                               id_token=str(data["id_token"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise LoginError(f"your login {self.path} is unreadable; run `credbroker login` "
                             "again") from None

    def clear(self) -> CachedLogin | None:
        """Delete the cached login; what it was (None if there was none or it was corrupt)."""
        try:
            was = self.load()
        except LoginError:
            was = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            return None
        return was

    def valid_token(self, now: datetime, *, skew: float = 30.0) -> str:
        """The cached ID token if it is still valid, else ``""`` when not logged in.

        Raises: LoginError (expired: log in again; or as :meth:`load`).
        """
        login = self.load()
        if login is None:
            return ""
        if (login.expires_at - now).total_seconds() <= skew:
            raise LoginError(f"your login as {login.subject} expired at "
                             f"{login.expires_at.isoformat(timespec='seconds')}; run "
                             "`credbroker login` again")
        return login.id_token


# -- the device authorization grant (RFC 8628)

def _check_url(url: str, what: str) -> str:
    """Raises: LoginError unless ``url`` is https, or http on loopback (the dev IdP)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in _LOOPBACK):
        return url
    raise LoginError(f"{what} {url!r} must be an https URL (plain http only on loopback)")


def _http(url: str, form: Mapping[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    """GET (or POST a form to) ``url``; (status, JSON body). Raises: LoginError (unreachable,
    not JSON)."""
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data,  # noqa: S310 - https or loopback http only
                                 headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:  # noqa: S310 - checked scheme
            status, raw = resp.status, resp.read(1024 * 1024)
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read(1024 * 1024)
    except (urllib.error.URLError, OSError) as exc:
        where = urllib.parse.urlsplit(url)
        raise LoginError(f"the identity provider {where.scheme}://{where.netloc} is "
                         f"unreachable ({type(exc).__name__})") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise LoginError(f"the identity provider answered {status} with something that is "
                         f"not JSON from {urllib.parse.urlsplit(url).path}") from None
    if not isinstance(body, dict):
        raise LoginError("the identity provider answered with unexpected JSON")
    return status, body


def _seconds(value: object, default: float) -> float:
    """A positive number of seconds from the provider's answer, else ``default``."""
    return float(value) if isinstance(value, int | float) and 0 < value < 86400 else default


def discover(issuer: str) -> dict[str, Any]:
    """The provider's discovery document (its ``issuer`` must be exactly ``issuer``).

    Raises: LoginError (unreachable, not https, issuer mismatch, no device endpoint).
    """
    _check_url(issuer, "the issuer")
    status, doc = _http(issuer.rstrip("/") + "/.well-known/openid-configuration")
    if status != 200:
        raise LoginError(f"{issuer} has no OIDC discovery document (HTTP {status})")
    if doc.get("issuer") != issuer:
        raise LoginError(f"{issuer}'s discovery document names issuer "
                         f"{doc.get('issuer')!r}; refusing it (OIDC Discovery 4.3)")
    for key in ("device_authorization_endpoint", "token_endpoint"):
        if not isinstance(doc.get(key), str):
            raise LoginError(f"{issuer} does not offer the device authorization grant "
                             f"(no {key} in its discovery document)")
        _check_url(doc[key], key)
    return doc


def device_login(issuer: str, client_id: str, *, scope: str = DEFAULT_SCOPE,
                 login_hint: str = "", announce: Callable[[str], None] = print,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> str:
    """Run the device authorization grant; the ID token once the person signed in.

    ``announce`` is told the URL and code to show the person (never a secret).

    Raises:
        LoginError: the provider is unreachable or misconfigured, the person denied the
            login, the code expired, or the answer holds no ID token for us.
    """
    doc = discover(issuer)
    form = {"client_id": client_id, "scope": scope}
    if login_hint:
        form["login_hint"] = login_hint
    status, auth = _http(doc["device_authorization_endpoint"], form)
    if status != 200 or not isinstance(auth.get("device_code"), str):
        raise LoginError(f"the identity provider refused the login ({status}): "
                         f"{auth.get('error', '?')}: {auth.get('error_description', '')}"
                         .rstrip(": "))
    interval = _seconds(auth.get("interval"), 5.0)
    deadline = clock() + _seconds(auth.get("expires_in"), 600.0)
    if not login_hint:
        page = auth.get("verification_uri_complete") or auth.get("verification_uri")
        announce(f"to sign in, open {page}\nand enter the code {auth.get('user_code')} "
                 "(waiting ...)")
    first = True
    while True:
        if not first:
            sleep(interval)
        first = False
        if clock() > deadline:
            raise LoginError("the sign-in code expired before anyone signed in; run "
                             "`credbroker login` again")
        status, tok = _http(doc["token_endpoint"], {"grant_type": DEVICE_GRANT,
                                                    "device_code": auth["device_code"],
                                                    "client_id": client_id})
        if status == 200:
            break
        error = tok.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5  # RFC 8628 3.5
            continue
        if error == "access_denied":
            raise LoginError("the sign-in was denied")
        if error == "expired_token":
            raise LoginError("the sign-in code expired before anyone signed in; run "
                             "`credbroker login` again")
        raise LoginError(f"the identity provider refused the login ({status}): {error}")
    id_token = tok.get("id_token")
    if not isinstance(id_token, str) or not id_token:
        raise LoginError("the identity provider returned no ID token (is 'openid' in the "
                         "client's allowed scopes?)")
    claims = claims_of(id_token)
    aud = claims.get("aud")
    if claims.get("iss") != issuer or client_id not in (aud if isinstance(aud, list)
                                                          else [aud]):
        raise LoginError(f"the ID token is not from {issuer} for client {client_id}; "
                         "refusing it")
    return id_token


# -- the commands

def _where(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str]:
    """(issuer, client id) for this login. Raises: ConfigError."""
    if args.dev:
        from broker.cli.audit import dev_info

        idp = dev_info(args.dev).get("dev_idp") or {}
        if not idp.get("url"):
            raise ConfigError(f"the dev stack in {args.dev} serves no identity provider; "
                              "restart `credbroker dev`")
        return str(idp["issuer"]), str(idp.get("client_id") or DEFAULT_CLIENT_ID)
    if args.as_user:
        raise ConfigError("--as USER only works with --dev DIR (the dev identity provider)")
    issuer = args.issuer or env.get("CREDBROKER_OIDC_ISSUER", "")
    if not issuer:
        raise ConfigError("which identity provider? pass --issuer URL or set "
                          "CREDBROKER_OIDC_ISSUER (the broker's --approver-issuer), or --dev "
                          "DIR for the dev stack")
    return issuer, args.client_id or env.get("CREDBROKER_OIDC_CLIENT_ID", DEFAULT_CLIENT_ID)


def dev_id_token(dev_dir: str, user: str) -> str:
    """A fresh ID token for dev user ``user`` from the dev stack's identity provider (the
    device grant with ``login_hint``; not cached). Raises: ConfigError, LoginError."""
    from broker.cli.audit import dev_info

    idp = dev_info(dev_dir).get("dev_idp") or {}
    if not idp.get("url"):
        raise ConfigError(f"the dev stack in {dev_dir} serves no identity provider; restart "
                          "`credbroker dev`")
    return device_login(str(idp["issuer"]), str(idp.get("client_id") or DEFAULT_CLIENT_ID),
                        login_hint=user)


def cmd_login(args: argparse.Namespace) -> int:
    """Raises: ConfigError (where to log in), LoginError."""
    env = os.environ
    issuer, client_id = _where(args, env)
    id_token = device_login(issuer, client_id, scope=args.scope, login_hint=args.as_user or "",
                            announce=lambda text: print(text, file=sys.stderr, flush=True))
    cache = TokenCache.from_env(env)
    try:
        login = cache.save(id_token, issuer=issuer)
    except OSError as exc:
        raise ConfigError(f"cannot write your login to {cache.path}: {exc.strerror}") from None
    print(f"logged in as {login.subject} (groups: {', '.join(login.groups) or 'none'}) until "
          f"{login.expires_at.isoformat(timespec='seconds')}; cached in {cache.path}")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    cache = TokenCache.from_env(os.environ)
    try:
        was = cache.clear()
    except OSError as exc:
        raise ConfigError(f"cannot delete your login {cache.path}: {exc.strerror}") from None
    print(f"logged out ({was.subject})" if was is not None else "not logged in")
    return 0


def add_parsers(sub: Any) -> None:
    s = sub.add_parser("login", help="sign in with your identity provider (OIDC device flow); "
                                     "the responder commands then act as you")
    s.add_argument("--issuer", help="the OIDC issuer URL ($CREDBROKER_OIDC_ISSUER; the "
                                    "broker's --approver-issuer)")
    s.add_argument("--client-id", help="the OIDC client id ($CREDBROKER_OIDC_CLIENT_ID; "
                                       f"default {DEFAULT_CLIENT_ID}, the broker's "
                                       "--approver-audience)")
    s.add_argument("--scope", default=DEFAULT_SCOPE, help=f"default {DEFAULT_SCOPE!r}")
    s.add_argument("--dev", metavar="DIR", help="the dev stack's identity provider")
    s.add_argument("--as", dest="as_user", metavar="USER",
                   help="with --dev: sign in as this dev user at once (dev only)")
    s.set_defaults(func=cmd_login)
    s = sub.add_parser("logout", help="forget your cached login")
    s.set_defaults(func=cmd_logout)
