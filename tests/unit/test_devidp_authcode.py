"""The dev IdP's authorization code flow with PKCE (the web console's sign-in)."""

from __future__ import annotations

import secrets
from pathlib import Path

import jwt

from credbroker_dev.devidp import DevIdp, s256


def _q(idp: DevIdp, verifier: str, redirect: str = "https://127.0.0.1:8600/callback") \
        -> dict[str, str]:
    return {"client_id": idp.client_id, "redirect_uri": redirect, "response_type": "code",
            "scope": "openid email groups", "state": "st", "nonce": "n-1",
            "code_challenge": s256(verifier), "code_challenge_method": "S256"}


def test_code_exchange_needs_the_pkce_verifier_and_works_once(tmp_path: Path) -> None:
    idp = DevIdp(tmp_path)
    verifier = secrets.token_urlsafe(48)
    q = _q(idp, verifier)
    assert idp.check_authorization(q) == "" and idp.redirect_error(q) == ""
    code = idp.grant_code(q, "alice@example.org")
    form = {"grant_type": "authorization_code", "code": code, "client_id": idp.client_id,
            "redirect_uri": q["redirect_uri"], "code_verifier": "wrong" * 10}
    status, body = idp.token(form)
    assert status == 400 and "PKCE" in body["error_description"]
    code = idp.grant_code(q, "alice@example.org")
    status, body = idp.token({**form, "code": code, "code_verifier": verifier})
    assert status == 200
    claims = jwt.decode(body["id_token"], options={"verify_signature": False})
    assert claims["nonce"] == "n-1" and claims["email"] == "alice@example.org"
    status, body = idp.token({**form, "code": code, "code_verifier": verifier})
    assert status == 400 and body["error"] == "invalid_grant"  # one use only
    idp.stop()


def test_only_loopback_or_registered_redirects_and_s256_only(tmp_path: Path) -> None:
    idp = DevIdp(tmp_path)
    v = secrets.token_urlsafe(48)
    assert idp.check_authorization(_q(idp, v, "https://evil.example/cb"))
    assert idp.check_authorization(_q(idp, v, "https://127.0.0.1.evil.example/cb"))
    idp.allow_redirect("https://console.example/cb")
    assert idp.check_authorization(_q(idp, v, "https://console.example/cb")) == ""
    assert idp.redirect_error({**_q(idp, v), "code_challenge_method": "plain"}) == \
        "invalid_request"
    assert "S256" in idp.discovery()["code_challenge_methods_supported"]
    idp.stop()
