"""Signing people in: OIDC authorization code flow with PKCE (RFC 6749 4.1, RFC 7636 S256).

The console is a confidential-less (public) client of the configured issuer, with the
same client id whose audience the broker accepts ID tokens for, so the ID token it
gets is the one the broker verifies on every state-changing call. The console verifies
it too (signature against the issuer's JWKS, issuer, audience, expiry, nonce) before it
opens a session.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from broker.errors import ConfigError


class LoginError(Exception):
    """The sign-in failed (the message says why; it never holds a code or token)."""


@dataclass(frozen=True, slots=True)
class LoginState:
    state: str
    nonce: str
    verifier: str = field(repr=False)
    created: float
    next_path: str = "/"


@dataclass(frozen=True, slots=True)
class Person:
    subject: str
    groups: tuple[str, ...]
    id_token: str = field(repr=False)  # secret
    expires_at: float


def _challenge(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class OidcClient:
    def __init__(self, *, issuer: str, client_id: str, redirect_uri: str) -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self.redirect_uri = redirect_uri
        self._meta: dict[str, Any] = {}
        self._keys: dict[str, Any] = {}

    async def discover(self, http: aiohttp.ClientSession) -> None:
        """Raises: ConfigError (the issuer's discovery document or JWKS is unusable)."""
        url = f"{self.issuer}/.well-known/openid-configuration"
        try:
            async with http.get(url) as r:
                r.raise_for_status()
                meta = await r.json()
            if meta.get("issuer") != self.issuer:
                raise ConfigError(f"{url} names issuer {meta.get('issuer')!r}, not "
                                  f"{self.issuer!r}")
            if "S256" not in meta.get("code_challenge_methods_supported", []) or \
                    "authorization_endpoint" not in meta:
                raise ConfigError(f"{self.issuer} does not offer the authorization code flow "
                                  "with PKCE S256")
            async with http.get(meta["jwks_uri"]) as r:
                r.raise_for_status()
                jwks = await r.json()
        except (aiohttp.ClientError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot discover the OIDC issuer {self.issuer}: "
                              f"{type(exc).__name__}: {exc}") from None
        self._meta = meta
        self._keys = {k.key_id or "": k for k in jwt.PyJWKSet.from_dict(jwks).keys}

    def start(self, next_path: str = "/") -> tuple[LoginState, str]:
        """A new login: its state (kept server-side) and the URL to send the browser to."""
        st = LoginState(state=secrets.token_urlsafe(24), nonce=secrets.token_urlsafe(24),
                        verifier=secrets.token_urlsafe(48), created=time.time(),
                        next_path=next_path)
        q = {"response_type": "code", "client_id": self.client_id,
             "redirect_uri": self.redirect_uri, "scope": "openid email groups",
             "state": st.state, "nonce": st.nonce,
             "code_challenge": _challenge(st.verifier), "code_challenge_method": "S256"}
        return st, f"{self._meta['authorization_endpoint']}?{urllib.parse.urlencode(q)}"

    async def finish(self, http: aiohttp.ClientSession, st: LoginState, code: str) -> Person:
        """Exchange the code (with the PKCE verifier) and verify the ID token.

        Raises: LoginError.
        """
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.redirect_uri, "client_id": self.client_id,
                "code_verifier": st.verifier}
        try:
            async with http.post(self._meta["token_endpoint"], data=form) as r:
                body = await r.json()
                if r.status != 200:
                    raise LoginError(f"the identity provider refused the sign-in: "
                                     f"{body.get('error', r.status)}")
        except (aiohttp.ClientError, ValueError) as exc:
            raise LoginError(f"the identity provider could not be reached "
                             f"({type(exc).__name__})") from None
        token = str(body.get("id_token", ""))
        return self.verify(token, nonce=st.nonce)

    def verify(self, token: str, *, nonce: str) -> Person:
        """Raises: LoginError."""
        try:
            key = self._keys.get(jwt.get_unverified_header(token).get("kid", ""))
            if key is None:
                raise LoginError("the ID token is signed by a key the issuer does not publish")
            claims = jwt.decode(token, key.key, algorithms=["RS256", "ES256", "EdDSA"],
                                audience=self.client_id, issuer=self.issuer,
                                options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.PyJWTError as exc:
            raise LoginError(f"the ID token was refused ({type(exc).__name__})") from None
        if not secrets.compare_digest(str(claims.get("nonce", "")), nonce):
            raise LoginError("the ID token's nonce does not match this sign-in (replayed?)")
        email = claims.get("email") if claims.get("email_verified") is True else None
        groups = claims.get("groups") or []
        return Person(subject=str(email or claims["sub"]),
                      groups=tuple(map(str, groups)) if isinstance(groups, list) else (),
                      id_token=token, expires_at=float(claims["exp"]))
