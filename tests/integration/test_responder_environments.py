"""The Responder with two declared environments, production and sandbox, each its own real
OpenBao (real SQLite registry, real audit file): a credential is revoked in the OpenBao that
minted it, an orphan is revoked, recorded and audited with its environment, and what one
environment's Vault could not do is named by that environment. Every assertion about a
token asks the OpenBao that holds it (or the other one).
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import hvac
import pytest

from broker.adapters.environments import Environments
from broker.adapters.vault import VaultAdapter
from broker.core.models import MintedToken
from broker.core.scopemap import ScopeMap
from credbroker_dev.devstack import OpenBaoDev, free_port
from tests.integration.conftest import root_client
from tests.integration.helpers import TcpProxy
from tests.integration.test_responder_exact import World, alive, entity_disabled

PROD, SANDBOX = "production", "sandbox"


def _bao(name: str) -> Iterator[OpenBaoDev]:
    server = OpenBaoDev(Path(tempfile.mkdtemp(prefix=f"cbre-{name}-")))
    server.start()
    hvac.Client(url=server.addr, token=server.root_token).secrets.kv.v2.create_or_update_secret(
        path="soc/enrichment/ti", secret={"env": name})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def production() -> Iterator[OpenBaoDev]:
    yield from _bao(PROD)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[OpenBaoDev]:
    yield from _bao(SANDBOX)


class TwoWorlds(World):
    """A World whose responder declares production (the World's OpenBao, the default
    environment) and sandbox; ``sandbox_vault`` is how the responder reaches sandbox (its
    OpenBao, or a proxy in front of it, or nothing listening)."""

    def __init__(self, tmp: Path, production: OpenBaoDev, sandbox: OpenBaoDev, smap: ScopeMap,
                 sandbox_addr: str = "") -> None:
        self.sandbox_vault = VaultAdapter(addr=sandbox_addr or sandbox.addr,
                                          token=sandbox.root_token, timeout=2)
        # Minting in sandbox goes straight to its OpenBao, whatever the responder reaches.
        self.sandbox_direct = VaultAdapter(addr=sandbox.addr, token=sandbox.root_token)
        self.sandbox_direct.sync_scope_map(smap)
        super().__init__(tmp, production, smap, environments=lambda prod: Environments(
            {PROD: prod, SANDBOX: self.sandbox_vault}, default=PROD, declared=True))

    def mint_in(self, environment: str, spiffe_id: str, *, record: bool = True
                ) -> MintedToken:
        return self.mint(spiffe_id, record=record, environment=environment,
                         vault=self.sandbox_direct if environment == SANDBOX else self.vault)


@pytest.fixture
def two(tmp_path: Path, production: OpenBaoDev, sandbox: OpenBaoDev,
        smap: ScopeMap) -> Iterator[TwoWorlds]:
    world = TwoWorlds(tmp_path, production, sandbox, smap)
    yield world
    world.close()


def test_a_credential_is_revoked_in_the_openbao_of_its_environment(
        two: TwoWorlds, production: OpenBaoDev, sandbox: OpenBaoDev) -> None:
    me = two.who()
    here = two.mint_in(SANDBOX, me)
    there = two.mint_in(PROD, me)
    row = two.store.get(here.accessor)
    assert row is not None and row.environment == SANDBOX
    [outcome] = list(two.responder.revoke([row], by="ir-1", reason="phished",
                                          selector="--environment sandbox"))
    assert (outcome.credential_id, outcome.result) == (here.accessor, "revoked")
    assert not alive(root_client(sandbox), here.accessor)
    assert alive(root_client(production), there.accessor)
    [rec] = two.records("credentials.revoked")
    assert rec["environments"] == {here.accessor: SANDBOX}
    assert rec["counts"] == {"revoked": 1, "already_dead": 0, "pending": 0, "failed": 0}


def test_an_orphan_in_sandbox_is_revoked_there_and_recorded_with_its_environment(
        two: TwoWorlds, production: OpenBaoDev, sandbox: OpenBaoDev) -> None:
    me = two.who()
    orphan = two.mint_in(SANDBOX, me, record=False)
    kept = two.mint_in(PROD, me)
    for intent in two.store.intents():  # as if the broker died between mint and record
        two.store.forget_intent(intent.request_id)
    report = two.responder.reconcile(full=True)
    assert (report.revoked, report.error) == (1, "")
    assert not alive(root_client(sandbox), orphan.accessor)
    assert alive(root_client(production), kept.accessor)
    row = two.store.get(orphan.accessor)
    assert row is not None and row.state == "revoked" and row.environment == SANDBOX
    [rec] = two.records("credential.revoked")
    assert (rec["credential_id"], rec["spiffe_id"], rec["environment"]) == (
        orphan.accessor, me, SANDBOX)


def test_sandbox_failing_to_revoke_an_orphan_is_named_and_production_goes_on(
        tmp_path: Path, production: OpenBaoDev, sandbox: OpenBaoDev, smap: ScopeMap,
        caplog: pytest.LogCaptureFixture) -> None:
    link = TcpProxy(sandbox.port)
    world = TwoWorlds(tmp_path, production, sandbox, smap, sandbox_addr=link.addr)
    try:
        me = world.who()
        orphan = world.mint_in(SANDBOX, me, record=False)
        for intent in world.store.intents():
            world.store.forget_intent(intent.request_id)
        # Production: an issuance long unresolved, for which its OpenBao holds no token.
        lost = uuid.uuid4().hex
        world.store.record_intent(request_id=lost, spiffe_id=me, action_class="enrichment",
                                  target="t", event_source="", event_id="",
                                  at=datetime.now(UTC) - timedelta(minutes=5),
                                  environment=PROD)
        link.fail_answers(b"revoke-accessor")  # sandbox lists its tokens, then fails
        with caplog.at_level(logging.WARNING, logger="credbroker.responder"):
            report = world.responder.reconcile(full=True)
        assert (report.revoked, report.cleared, report.pending) == (0, 1, 1)
        prefix = f"Vault ({SANDBOX}): Vault at {link.addr} is not serving ("
        assert report.error.startswith(prefix), report.error
        assert report.error.endswith(") while trying to revoke a credential; it may be sealed "
                                     "or restarting")
        assert [r.getMessage() for r in caplog.records
                if r.name == "credbroker.responder"] == [
            f"reconcile postponed where Vault did not answer: {report.error}"]
        # The registry: production's intent without a token is gone; sandbox's orphan is
        # not recorded as revoked (its Vault did not confirm), so the next round sees it.
        assert [i.request_id for i in world.store.intents()] == []
        assert world.store.get(orphan.accessor) is None
        assert world.records("credential.revoked") == []
    finally:
        link.cut()
        world.close()


def test_a_freeze_one_environments_vault_cannot_enforce_names_it_and_is_enforced_later(
        tmp_path: Path, production: OpenBaoDev, sandbox: OpenBaoDev, smap: ScopeMap) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    world = TwoWorlds(tmp_path, production, sandbox, smap, sandbox_addr=down)
    try:
        me = world.who()
        prod_token = world.mint_in(PROD, me)
        sandbox_token = world.mint_in(SANDBOX, me)
        res = world.responder.freeze(spiffe_id=me, action_class="", reason="rogue", by="ir")
        assert res.vault_pending
        assert res.vault_error.startswith(f"Vault ({SANDBOX}): Vault at {down} is unreachable "
                                          "while trying to look up a workload's entity ("), \
            res.vault_error
        [pending] = world.records("freeze.enforcement_pending")
        assert pending["vault_error"] == res.vault_error
        # Production's part is done: its OpenBao refuses the identity already.
        assert entity_disabled(root_client(production), prod_token.entity_id)
        assert not entity_disabled(root_client(sandbox), sandbox_token.entity_id)
        assert [f.id for f, _ in world.store.unenforced_freezes()] == [res.freeze.id]
        world.join()
        # Sandbox's OpenBao answers again: the retry enforces the freeze there too.
        world.responder.vaults = Environments(
            {PROD: world.vault, SANDBOX: world.sandbox_direct}, default=PROD, declared=True)
        assert world.responder.enforce_pending_freezes() == 0
        assert entity_disabled(root_client(sandbox), sandbox_token.entity_id)
        assert world.store.unenforced_freezes() == []
    finally:
        world.close()
