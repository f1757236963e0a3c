"""The web console in a real browser against a real dev stack (`credbroker dev`'s pieces)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from credbroker_dev.devstack import DevStack
from sidecar.client import SidecarClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONTAINMENT = "containment.isolate_host"
ALICE = "alice@example.org"  # ir-leads, responders
CAROL = "carol@example.org"  # iam-leads: an outsider to containment approvals
TRIAGE = "spiffe://example.org/agent/triage"


def shot(page: Any, shots: Path, name: str) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    docs = os.environ.get("CONSOLE_SCREENSHOTS_DIR")
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(docs) / path.name)


def sign_in(browser: Any, stack: DevStack, user: str, path: str = "/approvals") -> Any:
    ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.goto(stack.console_url + path)
    # The dev identity provider's sign-in page (authorization code + PKCE).
    page.wait_for_selector("select[name=user]")
    page.select_option("select[name=user]", user)
    page.click("button[value=approve]")
    page.wait_for_selector("[data-testid=who]")
    assert page.url == stack.console_url + path
    assert user in page.inner_text("[data-testid=who]")
    return page


def csrf_of(page: Any) -> str:
    return str(page.get_attribute("form[action='/logout'] input[name=csrf]", "value"))


def sidecar(stack: DevStack, name: str) -> SidecarClient:
    return SidecarClient(stack.sidecars[name]["socket"], timeout=90)


def containment_request(target: str, event_id: str, *, wait: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {
        "action_class": CONTAINMENT, "target": target,
        "initiating_event": {"source": "crowdstrike", "id": event_id,
                             "summary": "ransomware beaconing from " + target},
        "justification": f"isolate {target}: active C2 beaconing"}
    if wait:
        body["wait_seconds"] = wait
    return body


def test_sign_in_sets_strict_cookie_and_csp(browser: Any, stack: DevStack) -> None:
    page = sign_in(browser, stack, ALICE)
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["__Host-credbroker-console"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Strict"
    resp = page.request.get(stack.console_url + "/approvals")
    csp = resp.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # Logging out ends the session on the server: the old cookie opens nothing.
    old = session["value"]
    page.click("form[action='/logout'] button")
    page.wait_for_selector("text=You are signed out")
    page.context.add_cookies([{**session, "value": old}])
    r = page.request.get(stack.console_url + "/approvals", max_redirects=0)
    assert r.status == 303 and "/login" in r.headers["location"]
    page.context.close()


def test_approve_live_and_the_agent_gets_its_credential(browser: Any, stack: DevStack,
                                                        shots: Path) -> None:
    page = sign_in(browser, stack, ALICE)
    page.wait_for_selector("#live-status:has-text('live')")
    answer: dict[str, Any] = {}

    def agent() -> None:
        answer["status"], answer["body"] = sidecar(stack, "containment").raw(
            "POST", "/v1/credentials", containment_request("host-17", "DET-4711", wait=60))

    t = threading.Thread(target=agent, daemon=True)
    t.start()
    # It appears without a reload (server-sent events).
    card = page.locator("[data-testid=approval]", has_text="host-17")
    card.wait_for(timeout=15_000)
    assert "DET-4711" in card.inner_text() and "ir-leads" in card.inner_text()
    shot(page, shots, "approvals")
    card.locator("textarea[name=reason]").fill("confirmed C2 on host-17, isolate")
    card.locator("button[value=approve]").click()
    page.wait_for_selector(".flash.ok:has-text('Approved')")
    t.join(30)
    assert answer.get("status") == 200, answer.get("body", {}).get("error")
    assert answer["body"]["token"] and answer["body"]["credential_id"]
    assert answer["body"]["approval"]["approved_by"] == [ALICE]
    stack_state["credential_id"] = answer["body"]["credential_id"]

    # The trace of that credential, with the audit log's verification badge.
    page.goto(f"{stack.console_url}/audit?q={answer['body']['credential_id']}")
    assert "Verified" in page.inner_text("[data-testid=verified]")
    trace = page.inner_text("[data-testid=trace]")
    assert ALICE in trace and "DET-4711" in trace
    shot(page, shots, "audit-trace")
    page.context.close()


stack_state: dict[str, str] = {}


def test_deny_with_a_reason(browser: Any, stack: DevStack) -> None:
    page = sign_in(browser, stack, ALICE)
    status, body = sidecar(stack, "containment").raw(
        "POST", "/v1/credentials", containment_request("host-99", "DET-9"))
    assert status == 202
    card = page.locator(f"#approval-{body['approval_id']}")
    card.wait_for(timeout=15_000)
    # The reason is mandatory: the browser will not submit without one.
    card.locator("button[value=deny]").click()
    assert page.locator(".flash").count() == 0
    card.locator("textarea[name=reason]").fill("host-99 is the CEO's laptop; call first")
    card.locator("button[value=deny]").click()
    page.wait_for_selector(".flash.ok:has-text('Denied')")
    status, polled = sidecar(stack, "containment").raw(
        "GET", f"/v1/approvals/{body['approval_id']}")
    assert polled.get("status") == "denied" or polled.get("error", {}).get("code"), polled
    page.context.close()


def test_outsider_sees_why_and_a_forged_post_is_refused(browser: Any, stack: DevStack,
                                                         shots: Path) -> None:
    status, body = sidecar(stack, "containment").raw(
        "POST", "/v1/credentials", containment_request("host-3", "DET-3"))
    assert status == 202
    page = sign_in(browser, stack, CAROL)
    card = page.locator(f"#approval-{body['approval_id']}")
    card.wait_for(timeout=15_000)
    assert card.locator("button[value=approve]").count() == 0
    assert "only members of ir-leads" in card.locator("[data-testid=cannot-approve]"
                                                      ).inner_text()
    shot(page, shots, "approvals-outsider")
    forged = page.request.post(
        f"{stack.console_url}/approvals/{body['approval_id']}/decide",
        form={"csrf": csrf_of(page), "decision": "approve", "reason": "let me"})
    assert forged.status == 403
    # Nor may an outsider revoke or freeze (server-side, whatever the page shows).
    forged = page.request.post(f"{stack.console_url}/freeze",
                               form={"csrf": csrf_of(page), "kind": "spiffe_id",
                                     "pattern": TRIAGE, "reason": "x", "confirm": "1"})
    assert forged.status == 403
    page.context.close()


def test_freeze_an_agent_then_its_next_request_is_409(browser: Any, stack: DevStack,
                                                      shots: Path) -> None:
    page = sign_in(browser, stack, ALICE, "/freezes")
    page.select_option("select[name=kind]", "spiffe_id")
    page.fill("form.freeze input[name=pattern]", TRIAGE)
    page.fill("form.freeze input[name=reason]", "triage agent looping on enrichment")
    page.click("form.freeze button")
    page.wait_for_selector("[data-testid=preview]")
    shot(page, shots, "freeze-confirm")
    page.click("button:has-text('Confirm freeze')")
    page.wait_for_selector(".flash.ok:has-text('Frozen')")
    row = page.locator("[data-testid=freeze]", has_text=TRIAGE)
    assert ALICE in row.inner_text()
    shot(page, shots, "freezes")
    status, body = sidecar(stack, "triage").raw(
        "POST", "/v1/credentials", {"action_class": "enrichment", "justification": "after"})
    assert status == 409, body
    row.locator("input[name=reason]").fill("loop fixed")
    row.locator("button:has-text('Unfreeze')").click()
    page.wait_for_selector(".flash.ok:has-text('Lifted')")
    status, _ = sidecar(stack, "triage").raw(
        "POST", "/v1/credentials", {"action_class": "enrichment", "justification": "again"})
    assert status == 200
    page.context.close()


def test_revoke_a_selection(browser: Any, stack: DevStack, shots: Path) -> None:
    ids = []
    for n in range(3):
        status, body = sidecar(stack, "triage").raw(
            "POST", "/v1/credentials", {"action_class": "enrichment",
                                        "justification": f"selection {n}"})
        assert status == 200
        ids.append(body["credential_id"])
    page = sign_in(browser, stack, ALICE, "/credentials?action_class=enrichment")
    shot(page, shots, "credentials")
    for cid in ids[:2]:
        page.check(f"input[name=credential_id][value='{cid}']")
    page.click("button[value='1']:has-text('Revoke selected')")
    assert "2 live credential(s) would be revoked" in page.inner_text("[data-testid=preview]")
    shot(page, shots, "revoke-preview")
    page.fill("textarea[name=reason]", "suspected token leak in triage logs")
    page.click("button:has-text('Revoke 2 credential(s)')")
    page.wait_for_selector(".flash.ok:has-text('Revoked 2')")
    listed = page.inner_text("table.creds")
    assert ids[0] not in listed and ids[1] not in listed and ids[2] in listed
    page.context.close()


def test_a_stale_csrf_token_is_refused(browser: Any, stack: DevStack) -> None:
    page = sign_in(browser, stack, ALICE, "/freezes")
    stale = csrf_of(page)
    page.click("form[action='/logout'] button")
    page.goto(stack.console_url + "/freezes")
    page.select_option("select[name=user]", ALICE)
    page.click("button[value=approve]")
    page.wait_for_selector("[data-testid=who]")
    assert csrf_of(page) != stale
    r = page.request.post(f"{stack.console_url}/freeze",
                          form={"csrf": stale, "kind": "spiffe_id", "pattern": TRIAGE,
                                "reason": "stale", "confirm": "1"})
    assert r.status == 403 and "stale" in r.text()
    assert page.locator("[data-testid=freeze]").count() == 0  # nothing was frozen
    page.context.close()


def test_overview_and_reviews_pages(browser: Any, stack: DevStack, shots: Path) -> None:
    page = sign_in(browser, stack, ALICE, "/overview")
    assert page.locator("[data-testid=charts] svg").count() >= 1
    shot(page, shots, "overview")
    page.goto(stack.console_url + "/reviews")
    shot(page, shots, "reviews")
    time.sleep(0)
    page.context.close()
