"""Who approves: people with an OIDC ID token, or approval bots with a SPIFFE ID.

ID tokens are validated with pyjwt against the configured issuer's JWKS (a file;
in dev, the dev issuer that ``credbroker dev`` runs writes it): signature,
exact issuer, audience, expiry. Group membership comes from a token claim and,
optionally, a static mapping in the broker's configuration.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from broker.core.approvals import Approver
from broker.errors import ConfigError, IdentityError


class ApproverTokenError(IdentityError):
    """An approver's ID token was refused (the message says why)."""

    code = "bad_id_token"


@dataclass(frozen=True, slots=True, kw_only=True)
class ApproverConfig:
    issuer: str = ""
    audience: str = "credbroker-approvals"
    jwks_path: Path | None = None
    groups_claim: str = "groups"
    static_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    bots: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # SPIFFE ID -> groups
    owner_team_may_approve: bool = True
    webhook_url: str = ""
    #: An approval granted sooner than this after its request is counted as fast
    #: (``credbroker_approvals_fast_total``: rubber-stamping shows there first).
    fast_approval_seconds: float = 30.0


class OidcVerifier:
    def __init__(self, config: ApproverConfig) -> None:
        self._cfg = config
        self._keys: dict[str, Any] = {}
        if config.issuer and config.jwks_path is not None:
            try:
                jwks = json.loads(config.jwks_path.read_text())
                self._keys = {k.key_id or "": k for k in jwt.PyJWKSet.from_dict(jwks).keys}
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                raise ConfigError(f"cannot load the approvers' JWKS {config.jwks_path}: {exc}"
                                  ) from None

    def verify(self, token: str) -> Approver:
        """The person an ID token names, with their groups (claim plus static mapping).

        Raises: ApproverTokenError with a message a person can act on (never the token).
        """
        if not self._cfg.issuer:
            raise ApproverTokenError("this broker has no OIDC issuer configured for approvers "
                                     "(--approver-issuer and --approver-jwks)")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise ApproverTokenError("the ID token is not a JWT") from None
        key = self._keys.get(header.get("kid", ""))
        if key is None:
            raise ApproverTokenError(f"the ID token's key id {header.get('kid')!r} is not in the "
                                     f"JWKS of {self._cfg.issuer} (forged, or keys rotated)")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key.key, algorithms=["RS256", "ES256", "EdDSA"],
                audience=self._cfg.audience, issuer=self._cfg.issuer,
                options={"require": ["exp", "iat", "sub", "iss", "aud"]})
        except jwt.ExpiredSignatureError:
            raise ApproverTokenError("the ID token has expired; run `credbroker login` again"
                                     ) from None
        except jwt.InvalidIssuerError:
            raise ApproverTokenError(f"the ID token was issued by someone else; approvals "
                                     f"accept only {self._cfg.issuer}") from None
        except jwt.InvalidAudienceError:
            raise ApproverTokenError(f"the ID token is not for {self._cfg.audience!r}; get one "
                                     "for the credbroker approvals audience") from None
        except jwt.InvalidSignatureError:
            raise ApproverTokenError("the ID token's signature does not verify (forged?)"
                                     ) from None
        except jwt.PyJWTError as exc:
            raise ApproverTokenError(f"the ID token was refused: {exc}") from None
        # The e-mail names the approver only when the IdP vouches for it.
        email = claims.get("email") if claims.get("email_verified") is True else None
        subject = str(email or claims["sub"])
        groups = claims.get(self._cfg.groups_claim) or []
        if not isinstance(groups, list):
            groups = []
        groups = [*map(str, groups), *self._cfg.static_groups.get(subject, ())]
        return Approver(subject=subject, groups=tuple(dict.fromkeys(groups)), via="oidc",
                        issuer=self._cfg.issuer)

    def bot(self, spiffe_id: str) -> Approver | None:
        groups = self._cfg.bots.get(spiffe_id)
        if groups is None:
            return None
        return Approver(subject=spiffe_id, groups=groups, via="spiffe")


class DevIssuer:
    """The dev stack's OIDC issuer: signs ID tokens for named dev users (never in production).

    ``issuer`` is the ``iss`` it signs: :data:`ISSUER` for tests that sign tokens in
    process, the loopback URL of :class:`credbroker_dev.devidp.DevIdp` when served over HTTP.
    """

    ISSUER = "https://dev-idp.credbroker.invalid"
    #: Dev users and their groups: alice and dave may also revoke and freeze (responders).
    USERS: Mapping[str, tuple[str, ...]] = {
        "alice@example.org": ("ir-leads", "responders"),
        "bob@example.org": ("ir-leads", "ciso-office"),
        "carol@example.org": ("iam-leads",),
        "dave@example.org": ("soc-analysts", "responders"),
    }

    def __init__(self, directory: Path, *, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self.key_path = directory / "dev-idp.key"
        self.jwks_path = directory / "dev-idp.jwks.json"
        if self.key_path.exists():
            key = load_pem_private_key(self.key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{self.key_path} is not an EC key")
            self._key = key
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(self._key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                NoEncryption()))
        self.kid = "dev-" + jwt.utils.base64url_encode(
            self._key.public_key().public_numbers().x.to_bytes(32, "big")[:6]).decode()
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        jwk.update({"kid": self.kid, "alg": "ES256", "use": "sig"})
        self.jwks_path.write_text(json.dumps({"keys": [jwk]}))

    def id_token(self, subject: str, *, audience: str = "credbroker-approvals",
                 groups: tuple[str, ...] | None = None, ttl: int = 300,
                 issuer: str | None = None, nonce: str = "") -> str:
        """Raises: ConfigError for an unknown dev user (when groups are not given)."""
        if groups is None:
            if subject not in self.USERS:
                raise ConfigError(f"unknown dev approver {subject!r}; the dev identity provider "
                                  f"knows {', '.join(self.USERS)}")
            groups = self.USERS[subject]
        now = int(time.time())
        claims: dict[str, Any] = {"iss": issuer or self.issuer, "sub": subject,
                                  "email": subject, "email_verified": True,
                                  "aud": audience, "iat": now, "exp": now + ttl,
                                  "groups": list(groups), "jti": secrets.token_hex(8)}
        if nonce:  # OIDC Core 3.1.3.6: echoed for the authorization code flow
            claims["nonce"] = nonce
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})
