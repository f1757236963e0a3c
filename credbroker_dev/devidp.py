"""The dev identity provider over HTTP on loopback (``credbroker dev`` only, never production).

It serves what ``credbroker login`` needs from any OIDC provider:

- ``GET /.well-known/openid-configuration``: the discovery document;
- ``GET /jwks.json``: its signing key;
- ``POST /device_authorization``: the OAuth 2.0 device authorization grant
  (RFC 8628, section 3.1) for the one public client ``credbroker-approvals``;
- ``GET/POST /device``: the page where a person enters the user code, picks a dev
  user and approves (or denies) the login;
- ``POST /token``: ``grant_type=urn:ietf:params:oauth:grant-type:device_code``
  answers ``authorization_pending``, ``slow_down``, ``access_denied`` or
  ``expired_token`` (RFC 8628, section 3.5) until the login is approved, then
  the ID token (signed by :class:`broker.adapters.approvers.DevIssuer`), once;
  ``grant_type=authorization_code`` exchanges a code with its PKCE verifier;
- ``GET/POST /authorize``: the authorization code flow with PKCE (RFC 6749 4.1,
  RFC 7636, ``S256`` only) for the web console: a sign-in page where a person picks
  a dev user, then a redirect back with a one-time code. Redirect URIs must be
  loopback (``http(s)://127.0.0.1|localhost|[::1]:PORT/...``, as RFC 8252 allows for
  local clients) or registered with :meth:`DevIdp.allow_redirect`.

Dev shortcut, honestly labelled: a device authorization request carrying
``login_hint=<dev user>`` is approved at once for that user (there is no
password to check in dev). ``credbroker login --dev DIR --as USER`` and
``--as USER`` on the responder commands use it. A real IdP never does this: there
the person signs in on the verification page.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from broker.adapters.approvers import DevIssuer

_log = logging.getLogger("credbroker.dev-idp")

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_CLIENT_ID = "credbroker-approvals"
_USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # RFC 8628 6.1: no vowels, no look-alikes


@dataclass
class _Pending:
    user_code: str
    expires: float
    interval: float
    user: str = ""
    denied: bool = False
    last_poll: float = 0.0


@dataclass
class _AuthCode:
    user: str
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    expires: float


_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def s256(verifier: str) -> str:
    """RFC 7636 4.2: BASE64URL(SHA256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class DevIdp:
    """A loopback OIDC provider for the dev users of :class:`DevIssuer`. ``start``; ``stop``.

    The issuer is its own URL (``http://127.0.0.1:PORT``), as OIDC discovery requires.
    """

    def __init__(self, directory: Path, *, client_id: str = DEFAULT_CLIENT_ID,
                 token_ttl: int = 3600, interval: float = 1.0, code_ttl: int = 600) -> None:
        self.client_id = client_id
        self.token_ttl = token_ttl
        self.interval = interval
        self.code_ttl = code_ttl
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}  # device_code -> state
        self._codes: dict[str, _AuthCode] = {}  # authorization code -> its binding
        self._redirects: set[str] = set()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._http.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self._http.server_address[1]}"
        self.signer = DevIssuer(directory, issuer=self.issuer)
        self._thread: threading.Thread | None = None

    @property
    def jwks_path(self) -> Path:
        return self.signer.jwks_path

    def start(self) -> None:
        self._thread = threading.Thread(target=self._http.serve_forever, name="dev-idp",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._http.shutdown()
            self._thread.join(5)
            self._thread = None
        self._http.server_close()

    # -- the endpoints' logic (no HTTP here)

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "device_authorization_endpoint": f"{self.issuer}/device_authorization",
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "jwks_uri": f"{self.issuer}/jwks.json",
            "response_types_supported": ["code", "id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "grant_types_supported": [DEVICE_GRANT, "authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "scopes_supported": ["openid", "email", "groups"],
            "claims_supported": ["iss", "sub", "aud", "exp", "iat", "email", "email_verified",
                                 "groups"],
            "token_endpoint_auth_methods_supported": ["none"],
        }

    def authorize_device(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """RFC 8628 3.1/3.2: a device code and a user code (approved at once for a
        ``login_hint`` naming a dev user)."""
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client",
                         "error_description": f"the dev IdP knows only client "
                                              f"{self.client_id!r}"}
        if "openid" not in form.get("scope", "").split():
            return 400, {"error": "invalid_scope", "error_description": "scope must include "
                                                                        "openid"}
        hint = form.get("login_hint", "")
        if hint and hint not in DevIssuer.USERS:
            return 400, {"error": "invalid_request",
                         "error_description": f"unknown dev user {hint!r}; the dev identity "
                                              f"provider knows {', '.join(DevIssuer.USERS)}"}
        device_code = secrets.token_urlsafe(32)
        user_code = "-".join("".join(secrets.choice(_USER_CODE_ALPHABET) for _ in range(4))
                             for _ in range(2))
        with self._lock:
            self._expire()
            self._pending[device_code] = _Pending(
                user_code=user_code, expires=time.monotonic() + self.code_ttl,
                interval=self.interval, user=hint)
        if hint:
            _log.debug("dev login for %s approved by login_hint (dev only)", hint)
        page = f"{self.issuer}/device"
        return 200, {"device_code": device_code, "user_code": user_code,
                     "verification_uri": page,
                     "verification_uri_complete": f"{page}?user_code={user_code}",
                     "expires_in": self.code_ttl, "interval": self.interval}

    def decide(self, user_code: str, user: str, approve: bool) -> str:
        """The verification page's decision. Returns what to show the person."""
        if approve and user not in DevIssuer.USERS:
            return f"unknown dev user {user!r}"
        with self._lock:
            self._expire()
            found = next((p for p in self._pending.values()
                          if p.user_code == user_code.strip().upper()), None)
            if found is None:
                return f"no login is waiting for code {user_code!r} (expired, or mistyped)"
            if approve:
                found.user = user
            else:
                found.denied = True
        return (f"signed in as {user}: return to your terminal" if approve
                else "login denied: return to your terminal")

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """RFC 8628 3.4/3.5: poll for the ID token; or RFC 6749 4.1.3 with RFC 7636 4.5:
        exchange an authorization code."""
        if form.get("grant_type") == "authorization_code":
            return self.exchange_code(form)
        if form.get("grant_type") != DEVICE_GRANT:
            return 400, {"error": "unsupported_grant_type"}
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client"}
        code = form.get("device_code", "")
        now = time.monotonic()
        with self._lock:
            p = self._pending.get(code)
            if p is None:
                return 400, {"error": "invalid_grant",
                             "error_description": "unknown or already used device code"}
            if now >= p.expires:
                del self._pending[code]
                return 400, {"error": "expired_token"}
            if p.denied:
                del self._pending[code]
                return 400, {"error": "access_denied"}
            if not p.user:
                too_soon = p.last_poll and now - p.last_poll < p.interval * 0.8
                p.last_poll = now
                if too_soon:
                    p.interval += 1  # RFC 8628 3.5: the client adds 5 s; we are gentler
                    return 400, {"error": "slow_down"}
                return 400, {"error": "authorization_pending"}
            del self._pending[code]  # one ID token per device code
            user = p.user
        id_token = self.signer.id_token(user, audience=self.client_id, ttl=self.token_ttl)
        return 200, {"access_token": secrets.token_urlsafe(24), "token_type": "Bearer",
                     "expires_in": self.token_ttl, "id_token": id_token,
                     "scope": "openid email groups"}

    def _expire(self) -> None:
        now = time.monotonic()
        for code in [c for c, p in self._pending.items() if now >= p.expires]:
            del self._pending[code]
        for code in [c for c, a in self._codes.items() if now >= a.expires]:
            del self._codes[code]

    # -- authorization code + PKCE (the web console)

    def allow_redirect(self, uri: str) -> None:
        """Register a redirect URI that is not loopback."""
        self._redirects.add(uri)

    def _redirect_ok(self, uri: str) -> bool:
        if uri in self._redirects:
            return True
        u = urllib.parse.urlsplit(uri)
        host = u.netloc.rsplit(":", 1)[0] if not u.netloc.endswith("]") else u.netloc
        return (u.scheme in ("http", "https") and host in _LOOPBACK_HOSTS and not u.fragment
                and "@" not in u.netloc)

    def check_authorization(self, q: dict[str, str]) -> str:
        """Why this authorization request is refused before anything is redirected ("" if
        it is acceptable): an unknown client or a redirect URI we may not send codes to is
        never redirected to (RFC 6749 4.1.2.1)."""
        if q.get("client_id") != self.client_id:
            return f"unknown client; the dev IdP knows only client {self.client_id!r}"
        if not self._redirect_ok(q.get("redirect_uri", "")):
            return "the redirect_uri is neither loopback nor registered"
        return ""

    def redirect_error(self, q: dict[str, str]) -> str:
        """The OAuth error to redirect back with ("" if the request is acceptable)."""
        if q.get("response_type") != "code":
            return "unsupported_response_type"
        if "openid" not in q.get("scope", "").split():
            return "invalid_scope"
        if q.get("code_challenge_method") != "S256" or \
                not 43 <= len(q.get("code_challenge", "")) <= 128:
            return "invalid_request"  # PKCE S256 is required
        return ""

    def grant_code(self, q: dict[str, str], user: str) -> str:
        """A one-time code for ``user``. Raises: KeyError for an unknown dev user."""
        if user not in DevIssuer.USERS:
            raise KeyError(user)
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._expire()
            self._codes[code] = _AuthCode(
                user=user, client_id=q["client_id"], redirect_uri=q["redirect_uri"],
                challenge=q["code_challenge"], nonce=q.get("nonce", "")[:256],
                expires=time.monotonic() + 60)
        return code

    def exchange_code(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if form.get("client_id") != self.client_id:
            return 401, {"error": "invalid_client"}
        with self._lock:
            self._expire()
            grant = self._codes.pop(form.get("code", ""), None)  # one use, even when refused
        if grant is None:
            return 400, {"error": "invalid_grant",
                         "error_description": "unknown, expired or already used code"}
        if grant.client_id != form.get("client_id") or \
                grant.redirect_uri != form.get("redirect_uri"):
            return 400, {"error": "invalid_grant",
                         "error_description": "the code was issued for another client or "
                                              "redirect_uri"}
        if not hmac.compare_digest(s256(form.get("code_verifier", "")), grant.challenge):
            return 400, {"error": "invalid_grant",
                         "error_description": "the PKCE code_verifier does not match"}
        id_token = self.signer.id_token(grant.user, audience=self.client_id,
                                        ttl=self.token_ttl, nonce=grant.nonce)
        return 200, {"access_token": secrets.token_urlsafe(24), "token_type": "Bearer",
                     "expires_in": self.token_ttl, "id_token": id_token,
                     "scope": "openid email groups"}

    def sign_in_page(self, q: dict[str, str]) -> str:
        keep = "".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
                       for k, v in q.items()
                       if k in ("client_id", "redirect_uri", "response_type", "scope", "state",
                                "nonce", "code_challenge", "code_challenge_method"))
        options = "".join(f'<option value="{html.escape(u)}">{html.escape(u)} '
                          f'({html.escape(", ".join(g))})</option>'
                          for u, g in DevIssuer.USERS.items())
        return ("<!doctype html><title>Sign in: credbroker dev identity provider</title>"
                "<h1>Sign in to credbroker</h1>"
                "<p>Development only: anyone who can reach this page can sign in as any dev "
                f"user. <b>{html.escape(q.get('client_id', ''))}</b> asks for your identity "
                "and groups.</p>"
                f'<form method="post" action="/authorize">{keep}'
                f'<label>user <select name="user">{options}</select></label> '
                '<button name="action" value="approve">sign in</button> '
                '<button name="action" value="deny">cancel</button></form>')

    def page(self, user_code: str, message: str = "") -> str:
        options = "".join(f'<option value="{html.escape(u)}">{html.escape(u)} '
                          f'({html.escape(", ".join(g))})</option>'
                          for u, g in DevIssuer.USERS.items())
        note = f"<p><b>{html.escape(message)}</b></p>" if message else ""
        return ("<!doctype html><title>credbroker dev identity provider</title>"
                "<h1>credbroker dev identity provider</h1>"
                "<p>Development only: anyone who can reach this page can sign in as any dev "
                "user.</p>" + note +
                '<form method="post" action="/device">'
                f'<label>code <input name="user_code" value="{html.escape(user_code)}">'
                f'</label> <label>user <select name="user">{options}</select></label> '
                '<button name="action" value="approve">sign in</button> '
                '<button name="action" value="deny">deny</button></form>')


def _handler_for(idp: DevIdp) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # request lines carry user codes
            pass

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")  # RFC 6749 5.1
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: int, body: dict[str, Any]) -> None:
            self._send(status, json.dumps(body).encode(), "application/json")

        def _form(self) -> dict[str, str]:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 64 * 1024:
                return {}
            raw = self.rfile.read(length).decode("utf-8", "replace")
            return {k: v[0] for k, v in urllib.parse.parse_qs(raw).items()}

        def _redirect(self, uri: str, params: dict[str, str]) -> None:
            sep = "&" if urllib.parse.urlsplit(uri).query else "?"
            self.send_response(302)
            self.send_header("Location", uri + sep + urllib.parse.urlencode(params))
            self.send_header("Cache-Control", "no-store")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _authorize(self, q: dict[str, str], action: str | None) -> None:
            refused = idp.check_authorization(q)
            if refused:
                self._send(400, f"<!doctype html><p>{html.escape(refused)}</p>".encode(),
                           "text/html; charset=utf-8")
                return
            back = {"state": q["state"]} if q.get("state") else {}
            error = idp.redirect_error(q) or ("access_denied" if action == "deny" else "")
            if error:
                self._redirect(q["redirect_uri"], {"error": error, **back})
            elif action is None:
                self._send(200, idp.sign_in_page(q).encode(), "text/html; charset=utf-8")
            else:
                try:
                    code = idp.grant_code(q, q.get("user", ""))
                except KeyError:
                    self._send(400, b"<!doctype html><p>unknown dev user</p>",
                               "text/html; charset=utf-8")
                    return
                self._redirect(q["redirect_uri"], {"code": code, **back})

        def do_GET(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            if url.path == "/.well-known/openid-configuration":
                self._json(200, idp.discovery())
            elif url.path == "/jwks.json":
                self._send(200, idp.jwks_path.read_bytes(), "application/json")
            elif url.path == "/device":
                code = urllib.parse.parse_qs(url.query).get("user_code", [""])[0]
                self._send(200, idp.page(code).encode(), "text/html; charset=utf-8")
            elif url.path == "/authorize":
                q = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
                self._authorize(q, None)
            else:
                self._json(404, {"error": "not_found"})

        def do_POST(self) -> None:
            form = self._form()
            path = urllib.parse.urlsplit(self.path).path
            if path == "/device_authorization":
                self._json(*idp.authorize_device(form))
            elif path == "/token":
                self._json(*idp.token(form))
            elif path == "/device":
                said = idp.decide(form.get("user_code", ""), form.get("user", ""),
                                  form.get("action") == "approve")
                self._send(200, idp.page("", said).encode(), "text/html; charset=utf-8")
            elif path == "/authorize":
                self._authorize(form, form.get("action", "deny"))
            else:
                self._json(404, {"error": "not_found"})

    return Handler
