"""Wiring of ``credbroker serve``: Workload API sources, Vault, scope map, gRPC mTLS server."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection
from spiffe import JwtSource, X509Source

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.adapters.approvers import OidcVerifier
from broker.adapters.audit import AuditLog, AuditTrail, load_or_create_signing_key
from broker.adapters.environments import Environments
from broker.adapters.registry import SqlStore, open_store
from broker.adapters.vault import SyncReport, VaultAdapter
from broker.app.approval_desk import ApprovalDesk
from broker.app.issuance import Issuer
from broker.app.people import ResponderGate
from broker.app.replicas import Leadership, ReplicaFollower, new_replica_id
from broker.app.responder import BusEvent, Responder, RevocationBus
from broker.config import BrokerConfig, load_scope_map
from broker.core.scopemap import ScopeMap
from broker.errors import (
    AuditError,
    ConfigError,
    CredbrokerError,
    VaultPermissionError,
    VaultUnavailableError,
    WorkloadApiError,
)
from broker.grpc.admin import AdminService
from broker.grpc.approvals import ApprovalsService
from broker.grpc.observability import HealthMonitor, Metrics
from broker.grpc.service import Authenticator, BrokerService, ScopeMapHolder
from broker.wire.federation import FederatedBundles
from broker.wire.loop import LoopThread
from broker.wire.tls import SERVER_KEEPALIVE, local_authorities, pem_material, server_credentials

_log = logging.getLogger("credbroker.broker")




def utc_now() -> datetime:
    return datetime.now(UTC)


def environments_of(cfg: BrokerConfig, vault: VaultAdapter) -> Environments:
    """Every environment's Vault adapter: ``vault`` (``--vault-addr``) as the default one,
    then each ``--environment``; just ``vault`` when none is declared."""
    return Environments.build(vault, default=cfg.default_environment, extra=cfg.environments)


def _signature(path: Path) -> tuple[object, ...]:
    """What changes when the scope map's files change (follows ConfigMap symlink swaps)."""
    try:
        files = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")) \
            if path.is_dir() else [path]
        return tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size, f.stat().st_ino)
                     for f in files)
    except OSError as exc:
        return (f"unreadable: {exc.strerror}",)


class BrokerServer:
    """A running broker. ``start()`` returns once it serves; ``stop()`` drains and closes."""

    def __init__(self, config: BrokerConfig, *, clock: Callable[[], datetime] = utc_now) -> None:
        self.config = config
        self._clock = clock
        self._server: grpc.aio.Server | None = None
        self._x509: X509Source | None = None
        self._jwt: JwtSource | None = None
        self.port = 0
        self.stopped = threading.Event()
        self.scope_maps: ScopeMapHolder | None = None
        self._issuer: Issuer | None = None
        self._vault: VaultAdapter | None = None  # the default environment's
        self._vaults: Environments | None = None  # every environment's
        self._reload_lock = threading.Lock()
        self.audit: AuditTrail | None = None
        self.store: SqlStore | None = None
        self._follower: ReplicaFollower | None = None
        self.leadership: Leadership | None = None
        #: This process among the replicas (events it writes, the leader lock's session).
        self.replica_id = new_replica_id()
        self.responder: Responder | None = None
        self.desk: ApprovalDesk | None = None
        self.health: HealthMonitor | None = None
        self._metrics_server: Any = None
        self._aio: LoopThread | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._health_server: grpc.Server | None = None
        self.health_port = 0
        self._watcher: threading.Thread | None = None
        self._drift_watcher: threading.Thread | None = None
        self._kept_frozen: tuple[str, ...] = ()
        self._federation: FederatedBundles | None = None

    def start(self) -> None:
        """Load the scope map, bring Vault in line, and serve.

        Raises:
            ConfigError, ScopeMapError: the scope map cannot be loaded.
            WorkloadApiError: no SVID from the Workload API within 10 s.
            VaultUnavailableError, VaultError: Vault could not be set up.
        """
        cfg = self.config
        key = load_or_create_signing_key(cfg.audit_key_path, create=True) \
            if cfg.audit_key_path else None
        self.metrics = Metrics()
        try:
            self.store = open_store(url=cfg.store_url, registry=cfg.registry_path,
                                    pool_size=min(cfg.max_workers, 32))
            self.audit = self._open_audit(cfg, self.store, key)
            self._start(cfg)
        except BaseException:
            self._stop_serving(0)
            if self.audit is not None:
                self.audit.close()
            if self.store is not None:
                self.store.close()
            raise

    def _open_audit(self, cfg: BrokerConfig, store: SqlStore,
                    key: Ed25519PrivateKey | None) -> AuditTrail:
        """The audit log: in the database with a PostgreSQL store (one chain for this
        process), else the file. Raises: AuditError; ConfigError (no file configured)."""
        if store.shared:
            from broker.adapters.audit_pg import PostgresAuditLog, chain_origin
            from broker.adapters.store_pg import PostgresStore

            assert isinstance(store, PostgresStore)
            if cfg.audit_path is not None:
                _log.warning("--audit-log %s is not used: with a PostgreSQL store the audit "
                             "log lives in the database (`credbroker audit verify --store "
                             "…`)", cfg.audit_path)
            return PostgresAuditLog(store, origin=chain_origin(self.replica_id),
                                    signing_key=key, mirror_path=cfg.checkpoint_mirror,
                                    clock=self._clock, on_error=self.metrics.audit_errors.inc)
        if cfg.audit_path is None:
            raise ConfigError("no audit log: pass --audit-log PATH or set CREDBROKER_AUDIT_LOG "
                              "(the broker does not run without one)")
        return AuditLog(cfg.audit_path, signing_key=key, mirror_path=cfg.checkpoint_mirror,
                        clock=self._clock, on_error=self.metrics.audit_errors.inc)

    def _start(self, cfg: BrokerConfig) -> None:
        assert self.audit is not None
        assert self.store is not None
        scope_map = load_scope_map(cfg.scope_map_path,
                                   vault_allowed_mounts=cfg.vault_allowed_mounts)
        vault = VaultAdapter(addr=cfg.vault_addr, token=cfg.vault_token,
                             token_file=cfg.vault_token_file, ca_cert=cfg.vault_ca_cert)
        vaults = environments_of(cfg, vault)
        vaults.check_scope_map(scope_map)
        self.scope_maps = ScopeMapHolder(scope_map)
        holder = self.scope_maps
        self.responder = Responder(store=self.store, vault=vault, audit=self.audit,
                                   bus=RevocationBus(), scope_map=lambda: holder.current,
                                   clock=self._clock, environments=vaults)
        self._vault = vault
        self._vaults = vaults
        responder = self.responder

        def leading(now: bool) -> None:
            self.metrics.leader.set(1 if now else 0)
            if now:  # whatever the last leader left (its intents too) is ours now
                responder.reconcile_soon()

        self.leadership = Leadership(self.store, replica_id=self.replica_id,
                                     on_change=leading).start()
        self.responder.is_leader = self.leadership.is_leader
        if self.store.shared:  # other replicas revoke, freeze and approve too: follow them
            self._follower = ReplicaFollower(self.responder, replica_id=self.replica_id,
                                             leader=self.leadership.is_leader).start()
            self.responder.replicate = self._follower.publish
        # Crash recovery and Vault set-up never keep the broker from starting: what
        # cannot be done now is pending, retried in the background, and health says so.
        for env, v in vaults:
            try:
                for problem in v.check_capabilities():
                    _log.error("%s: %s", vaults.label(env).upper(), problem)
            except CredbrokerError as exc:
                _log.error("%s: cannot check the broker's capabilities yet: %s",
                           vaults.label(env).upper(), exc)
        report = self._sync_vault(scope_map)
        try:
            self._x509 = X509Source(socket_path=cfg.workload_api_socket, timeout_in_seconds=10)
            self._jwt = JwtSource(socket_path=cfg.workload_api_socket, timeout_in_seconds=10)
        except Exception as exc:
            self._close_sources()
            raise WorkloadApiError(
                f"no SVID from the Workload API at {cfg.workload_api_socket} within 10 s "
                f"({type(exc).__name__}); is the SPIRE agent (or `credbroker dev`) running?"
            ) from None
        me = pem_material(self._x509)
        jwt_source = self._jwt
        self.audit.append("broker.started", spiffe_id=me.spiffe_id, listen=cfg.listen,
                          vault_addr=cfg.vault_addr, scope_map_version=scope_map.version,
                          **({"environments": {cfg.default_environment: cfg.vault_addr,
                                               **{e.name: e.addr for e in cfg.environments}},
                              "default_environment": cfg.default_environment}
                             if vaults.declared else {}))
        if self.audit.unsigned_at_open:
            self.audit.append("audit.unsigned_tail", records=self.audit.unsigned_at_open,
                              first_seq=self.audit.size - self.audit.unsigned_at_open,
                              note="records found at start that no signature covered: "
                                   "written just before a crash, or appended by someone "
                                   "else; now signed")
        if report is not None:
            self._audit_loaded(scope_map, report)
        recovered = self.responder.reconcile(startup=True)
        if recovered.revoked or recovered.cleared:
            _log.warning("crash recovery: %d unfinished issuance(s) without a token cleared; "
                         "%d token(s) minted but never recorded were revoked",
                         recovered.cleared, recovered.revoked)
        if recovered.error:
            _log.error("crash recovery postponed until Vault answers: %s", recovered.error)
        try:
            if self.leadership.is_leader():  # else the leader's loops do it
                self.responder.enforce_pending_freezes()
                self.responder.retry_pending()
                self.responder.revoke_frozen_leftovers(min_age=timedelta(0))
        except CredbrokerError as exc:
            _log.error("pending freezes and revocations: retried in the background (%s)", exc)
        threading.Thread(target=self.responder.run_retry_loop, daemon=True,
                         name="revoke-retry").start()
        threading.Thread(target=self.responder.run_reconcile_loop, daemon=True,
                         name="reconcile").start()
        if report is None:
            threading.Thread(target=self._sync_until_done, daemon=True,
                             name="vault-sync").start()
        else:  # a class removed while the broker was down
            self.responder.end_removed_classes(scope_map)
        federation = self._start_federation(cfg, me.trust_domain)
        x509_source = self._x509
        authenticator = Authenticator(
            trust_domain=me.trust_domain, audience=cfg.jwt_audience,
            jwt_bundle_for=jwt_source.get_bundle_for_trust_domain,
            require_jwt=cfg.require_jwt_svid, clock=self._clock, federation=federation,
            local_authorities=lambda: local_authorities(x509_source, me.trust_domain))
        self.desk = ApprovalDesk(store=self.store, audit=self.audit, config=cfg.approvers,
                                 clock=self._clock, team_scopes=cfg.team_scopes)
        self.desk.is_leader = self.leadership.is_leader
        if self._follower is not None:
            self._follower.desk = self.desk
            self.desk.replicate = self._follower.publish
        verifier = OidcVerifier(cfg.approvers)
        if not cfg.approvers.issuer and not cfg.automation_ids:
            _log.warning("no OIDC issuer (--approver-issuer) and no --automation-id: nobody can "
                         "revoke, freeze or unfreeze through this broker")
        else:
            _log.info("revoke/freeze/unfreeze: people in %s (ID tokens from %s)%s",
                      ", ".join(cfg.responder_groups), cfg.approvers.issuer or "no issuer",
                      "; automation " + ", ".join(cfg.automation_ids)
                      if cfg.automation_ids else "")
        if cfg.team_scopes:
            _log.info("team-scoped responders and approvers: %s", "; ".join(
                f"{who} for {', '.join(teams)}" for who, teams in cfg.team_scopes.items()))
        threading.Thread(target=self.desk.run_ticker, daemon=True, name="approvals").start()
        # Blocking work (hvac, sqlite, the audit log's fsync) runs in this bounded pool: the
        # sync gRPC methods run in it whole; the async ones (revocation streams, approval
        # waits) wait on the event loop at no thread's cost and use it only to issue.
        self._pool = futures.ThreadPoolExecutor(max_workers=cfg.max_workers,
                                                thread_name_prefix="broker")
        service = BrokerService(scope_maps=self.scope_maps, audit=self.audit, vault=vault,
                                responder=self.responder, desk=self.desk,
                                authenticator=authenticator, clock=self._clock,
                                metrics=self.metrics, executor=self._pool,
                                environments=vaults)
        self._issuer = service.issuer
        self.responder.metrics = self.metrics
        self.desk.metrics = self.metrics
        store, desk, audit = self.store, self.desk, self.audit

        def refresh() -> None:
            self.metrics.live_credentials.set(store.count_live(self._clock()))
            self.metrics.pending_approvals.set(len(desk.pending()))

        def vault_token(v: VaultAdapter) -> Callable[[], None]:
            def check() -> None:
                problems = v.check_capabilities()
                if problems:
                    raise VaultPermissionError("; ".join(problems))
            return check

        def vault_in_line() -> None:
            if not holder.vault_synced:
                raise VaultUnavailableError("the scope map is not yet in Vault (retrying)")

        # One pair of checks per environment's Vault, named by it ("Vault (sandbox)").
        checks: dict[str, Callable[[], None]] = {}
        for env, v in vaults:
            checks[vaults.label(env)] = v.health
            checks[vaults.label(env).replace("Vault", "Vault token", 1)] = vault_token(v)
        self.health = HealthMonitor(checks={**checks,
                                            "Vault policies": vault_in_line,
                                            "audit log": audit.check_writable,
                                            "registry": store.check},
                                    metrics=self.metrics, refresh=refresh,
                                    interval=cfg.health_interval)
        approvals = ApprovalsService(desk=self.desk, authenticator=authenticator,
                                     verifier=verifier, admins=frozenset(cfg.admin_ids))
        admin = AdminService(responder=self.responder, authenticator=authenticator,
                             admins=frozenset(cfg.admin_ids), clock=self._clock,
                             gate=ResponderGate(verifier=verifier, groups=cfg.responder_groups,
                                                automation=cfg.automation_ids,
                                                team_scopes=cfg.team_scopes))
        self.health.check_now()
        threading.Thread(target=self.health.run, daemon=True, name="health").start()
        pool, health_monitor = self._pool, self.health
        credentials = server_credentials(self._x509, federated=None if federation is None else
                                         lambda: (federation.generation,
                                                  federation.x509_roots_pem()))

        async def serve() -> tuple[grpc.aio.Server, int]:
            server = grpc.aio.server(migration_thread_pool=pool,
                                     options=list(SERVER_KEEPALIVE))
            pb_grpc.add_CredentialBrokerServicer_to_server(service, server)
            pb_grpc.add_CredentialAdminServicer_to_server(admin, server)
            pb_grpc.add_ApprovalsServicer_to_server(approvals, server)
            health_monitor.add_to(server)
            # grpcurl and friends discover the API through reflection.
            reflection.enable_server_reflection([
                pb.DESCRIPTOR.services_by_name[name].full_name
                for name in ("CredentialBroker", "CredentialAdmin", "Approvals")
            ] + [health.SERVICE_NAME, reflection.SERVICE_NAME], server)
            try:
                port = server.add_secure_port(cfg.listen, credentials)
            except RuntimeError:
                port = 0
            if port:
                await server.start()
            return server, port

        # The gRPC server is asyncio (grpc.aio) on its own loop thread.
        self._aio = LoopThread("broker-aio")
        server, self.port = self._aio.run(serve())
        if self.port == 0:
            raise WorkloadApiError(f"cannot listen on {cfg.listen}")
        self._server = server
        if cfg.metrics_listen:
            self._metrics_server = self.metrics.serve(cfg.metrics_listen)
        if cfg.health_listen:
            # kubelet's gRPC probes cannot do mTLS: the health service alone, in plaintext.
            self._health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
            self.health.add_to(self._health_server)
            self.health_port = self._health_server.add_insecure_port(cfg.health_listen)
            self._health_server.start()
        host = cfg.listen.rpartition(":")[0]
        _log.info("broker %s serving on %s:%d (mTLS, trust domain %s)", me.spiffe_id, host,
                  self.port, me.trust_domain)
        self._checkpointer = threading.Thread(target=self._checkpoint_loop, daemon=True,
                                              name="audit-checkpoint")
        self._checkpointer.start()
        if cfg.reload_interval > 0:
            self._watcher = threading.Thread(target=self._watch_scope_map, daemon=True,
                                             name="scope-map-watch")
            self._watcher.start()
        if cfg.vault_drift_interval > 0:
            self._drift_watcher = threading.Thread(target=self._watch_vault_drift, daemon=True,
                                                   name="vault-drift")
            self._drift_watcher.start()
        if cfg.ready_file is not None:
            tmp = cfg.ready_file.with_suffix(".tmp")
            tmp.write_text(f"{host}:{self.port}\n")
            tmp.replace(cfg.ready_file)

    def _start_federation(self, cfg: BrokerConfig, own: str) -> FederatedBundles | None:
        """The federated trust domains' bundles, loaded and kept current (None: none).

        Raises: ConfigError (a static bundle file that cannot be read or parsed)."""
        if not cfg.federation:
            return None
        audit = self.audit
        assert audit is not None
        fed = FederatedBundles(cfg.federation, local_trust_domain=own)
        fed.on_update = lambda td, b, where: audit.append_or_queue(
            "federation.bundle", trust_domain=td, source=where,
            x509_authorities=len(b.x509_authorities), jwt_keys=b.jwt_bundle is not None,
            sequence=b.sequence, refresh_hint=b.refresh_hint)
        fed.load()
        self._federation = fed
        threading.Thread(target=fed.run, daemon=True, name="federation").start()
        return fed

    def _sync_vault(self, scope_map: ScopeMap) -> SyncReport | None:
        """Bring Vault in line with ``scope_map`` (frozen classes stay frozen). Returns None,
        with issuance refused (503) until it succeeds, when Vault cannot be reached now."""
        assert self.scope_maps is not None and self._vaults is not None
        frozen = self.responder.frozen_classes() if self.responder else frozenset()
        try:
            report = self._vaults.sync_scope_map(scope_map, frozen)
        except CredbrokerError as exc:  # unreachable, or refused: retried, health says why
            self.scope_maps.vault_synced = False
            _log.error("scope map %s is not yet in Vault (%s); issuance is refused until it is; "
                       "retrying", scope_map.version[:19], exc)
            return None
        self.scope_maps.vault_synced = True
        _log.info("scope map %s loaded: %d classes; Vault policies written: %s; roles written: %s",
                  scope_map.version[:19], len(scope_map.classes),
                  ",".join(report.policies_written) or "none",
                  ",".join(report.roles_written) or "none")
        return report

    def _audit_loaded(self, scope_map: ScopeMap, report: SyncReport) -> None:
        assert self.audit is not None
        self.audit.append_or_queue("scope_map.loaded", scope_map_version=scope_map.version,
                                   sources=list(scope_map.sources),
                                   classes=list(scope_map.classes),
                                   vault_policies_written=list(report.policies_written),
                                   vault_roles_written=list(report.roles_written))

    def _sync_until_done(self) -> None:
        """Retry the start-up Vault sync until Vault answers (then issuance opens)."""
        assert self.scope_maps is not None
        assert self.responder is not None
        while not self.stopped.wait(self.config.health_interval):
            try:
                with self._reload_lock, self.responder.class_policy_lock:
                    current = self.scope_maps.current
                    report = self._sync_vault(current)
            except Exception:  # e.g. Vault refusing (4xx): keep trying, health says why
                _log.exception("bringing Vault in line with the scope map failed; retrying")
                continue
            if report is not None:
                self._audit_loaded(current, report)
                _log.warning("scope map %s is now in Vault: issuance open",
                             current.version[:19])
                return

    def reload(self) -> bool:
        """Load the scope map again; put it in force only if it is valid and Vault accepted it.

        A map that fails validation, or that Vault cannot be brought in line
        with, is rejected and logged loudly; the map in force stays. Returns
        True when a new version is now in force. Never raises.
        """
        assert self.scope_maps is not None and self._vaults is not None
        assert self.responder is not None
        with self._reload_lock, self.responder.class_policy_lock:
            old = self.scope_maps.current
            frozen = self.responder.frozen_classes()
            synced = False
            try:
                new = load_scope_map(self.config.scope_map_path,
                                     vault_allowed_mounts=self.config.vault_allowed_mounts)
                if new.version == old.version:
                    return False
                self._vaults.check_scope_map(new)
                synced = True  # from here Vault may hold part of the new map
                report = self._vaults.sync_scope_map(new, frozen)
                if self.audit is not None:
                    self.audit.append("scope_map.loaded", scope_map_version=new.version,
                                      previous_version=old.version, sources=list(new.sources),
                                      classes=list(new.classes),
                                      vault_policies_written=list(report.policies_written),
                                      vault_roles_written=list(report.roles_written))
            except CredbrokerError as exc:
                _log.error("REJECTED scope map reload from %s; scope map %s stays in force: %s",
                           self.config.scope_map_path, old.version[:19], exc)
                if synced:
                    # Vault evaluates policies per request: put the old map's back at once.
                    try:
                        self._vaults.sync_scope_map(old, frozen)
                    except CredbrokerError as again:
                        _log.critical("Vault could not be put back in line with scope map %s "
                                      "after a rejected reload: %s", old.version[:19], again)
                if self.audit is not None:
                    self.audit.append_or_queue("scope_map.rejected",
                                               source=str(self.config.scope_map_path),
                                               in_force=old.version, problem=str(exc)[:4000])
                return False
            self.scope_maps.replace(new)
            self.scope_maps.vault_synced = True  # the whole new map is in Vault
            # Sidecars drop what they cached under the old map: an identical request is
            # decided again under the new one.
            self.responder.bus.publish(BusEvent(scope_map_version=new.version))
        _log.warning("scope map %s is now in force (was %s); classes %d; Vault policies "
                     "written: %s; roles written: %s", new.version[:19], old.version[:19],
                     len(new.classes), ",".join(report.policies_written) or "none",
                     ",".join(report.roles_written) or "none")
        # A class the new map no longer has: its live credentials end now (outside the
        # locks: emptying its policy takes the class-policy lock itself).
        self.responder.end_removed_classes(new, removed=set(old.classes) - set(new.classes))
        return True

    def _watch_scope_map(self) -> None:
        seen = _signature(self.config.scope_map_path)
        while not self.stopped.wait(self.config.reload_interval):
            current = _signature(self.config.scope_map_path)
            if current != seen:
                seen = current
                self.reload()

    def check_vault_drift(self) -> SyncReport | None:
        """Put back every managed Vault policy and token role that differs from what we wrote.

        The map in force (and the freezes: a frozen class stays frozen) says what
        each ``credbroker-<class>`` policy and role must be; the sync rewrites only
        what differs, so anything it had to write was changed behind the broker's
        back. That is drift: recorded as ``vault.drift_corrected`` (names only),
        counted in ``credbroker_vault_drift_corrected_total`` and logged as an ERROR.
        It never lifts a freeze: a class Vault holds frozen stays frozen even when
        this broker's registry does not know the freeze (another replica's).
        Holds the reload lock, so a drift check and a reload never interleave.
        Returns the sync's report, or None when Vault could not be asked. Never raises.
        """
        assert self.scope_maps is not None and self._vaults is not None
        assert self.responder is not None
        with self._reload_lock, self.responder.class_policy_lock:
            scope_map = self.scope_maps.current
            try:
                report = self._vaults.sync_scope_map(scope_map,
                                                     self.responder.frozen_classes(),
                                                     keep_frozen=True)
            except CredbrokerError as exc:
                _log.warning("Vault drift check could not finish (next in %.0f s): %s",
                             self.config.vault_drift_interval, exc)
                return None
        if report.kept_frozen != self._kept_frozen:
            self._kept_frozen = report.kept_frozen
            if report.kept_frozen:
                _log.warning("Vault holds class(es) %s frozen, which this broker's registry does "
                             "not: left frozen (another replica froze them?); unfreeze through "
                             "the broker that froze them, or `credbroker vault sync`",
                             ",".join(report.kept_frozen))
        if not report.policies_written and not report.roles_written:
            return report
        self.metrics.vault_drift_corrected.labels(kind="policy").inc(
            len(report.policies_written))
        self.metrics.vault_drift_corrected.labels(kind="token_role").inc(
            len(report.roles_written))
        _log.error("Vault DRIFT corrected: managed objects had been changed outside the broker "
                   "and were rewritten from scope map %s: policies %s; token roles %s",
                   scope_map.version[:19], ",".join(report.policies_written) or "none",
                   ",".join(report.roles_written) or "none")
        if self.audit is not None:
            self.audit.append_or_queue("vault.drift_corrected",
                                       scope_map_version=scope_map.version,
                                       policies=list(report.policies_written),
                                       token_roles=list(report.roles_written))
        return report

    def _watch_vault_drift(self) -> None:
        while not self.stopped.wait(self.config.vault_drift_interval):
            if self.leadership is None or self.leadership.is_leader():  # one replica corrects
                self.check_vault_drift()

    def checkpoint(self) -> None:
        """Sign a checkpoint now (SIGUSR1 does this). Never raises: failures are logged."""
        if self.audit is None:
            return
        try:
            cp = self.audit.checkpoint()
        except AuditError as exc:
            _log.error("audit checkpoint failed: %s", exc)
            return
        if cp is not None:
            _log.info("audit checkpoint signed: size %d head %s", cp.size, cp.head[:16])

    def _checkpoint_loop(self) -> None:
        last = -1
        while not self.stopped.wait(self.config.checkpoint_interval):
            if self.audit is not None and self.audit.size != last:
                last = self.audit.size
                self.checkpoint()

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace`` seconds."""
        if self.health is not None:
            self.health.stop()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        if self._health_server is not None:
            self._health_server.stop(0)
        if self._follower is not None:
            self._follower.stop()
        if self.leadership is not None:
            self.leadership.stop()  # another replica takes the lock at once
        if self.responder is not None:
            self.responder.bus.close()
        if self.desk is not None:
            self.desk.close()
        self._stop_serving(grace)
        if self.responder is not None:
            self.responder.close()
        self._close_sources()
        if self._federation is not None:
            self._federation.stop()
        self.stopped.set()
        if self.audit is not None:
            self.audit.append_or_queue("broker.stopped")
            self.checkpoint()
            self.audit.close()
        if self.store is not None:
            self.store.close()

    def _stop_serving(self, grace: float) -> None:
        """Stop the gRPC server (in-flight calls get ``grace`` seconds), its loop and pool."""
        if self._aio is not None:
            if self._server is not None:
                try:
                    self._aio.run(self._server.stop(grace), timeout=grace + 10)
                except Exception as exc:  # stopping must go on
                    _log.warning("the gRPC server did not stop cleanly: %s", exc)
                self._server = None
            self._aio.close()
            self._aio = None
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._issuer is not None:
            self._issuer.close()  # the audit writes under way finish first
            self._issuer = None

    def _close_sources(self) -> None:
        for src in (self._x509, self._jwt):
            if src is not None:
                try:
                    src.close()
                except Exception as exc:  # closing must not mask the real error
                    _log.debug("closing Workload API source: %s", exc)
