"""The CredentialBroker gRPC servicer: authenticate, decide, mint — and translate errors once.

Every error raised below is one of ``broker.errors``; :func:`_boundary` maps it
to a gRPC status exactly once. Denials also carry the Decision in the trailing
metadata key ``credbroker-decision-bin`` and our stable error code in
``credbroker-error-code``, so the sidecar can answer the agent precisely.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import grpc
from cryptography import x509
from google.protobuf.timestamp_pb2 import Timestamp
from spiffe import JwtBundle, TrustDomain

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.adapters.audit import AuditTrail
from broker.adapters.environments import Environments
from broker.adapters.vault import VaultAdapter
from broker.app.approval_desk import ApprovalDesk
from broker.app.budget import StoreBudget
from broker.app.issuance import DeniedByPolicy, Issued, Issuer, PendingApproval
from broker.app.responder import BusEvent, FreezeResult, Responder
from broker.core import approvals as ap
from broker.core.approvals import ApprovalError, ApprovalNotFoundError
from broker.core.models import (
    Caller,
    CredentialRequest,
    Decision,
    InitiatingEvent,
    Outcome,
)
from broker.core.records import request_to_json, rfc3339
from broker.core.revocation import Freeze, first_freeze
from broker.core.scopemap import HARD_MAX_TTL_SECONDS, ScopeMap
from broker.errors import (
    AuditError,
    CredbrokerError,
    IdentityError,
    InvalidRequestError,
    NotFoundError,
    PolicyError,
    TooManyWaitsError,
    VaultError,
    VaultUnavailableError,
    spec_for,
)
from broker.grpc.identity import JwtSvidCache, check_chain, spiffe_id_from_certificate
from broker.grpc.observability import Metrics
from broker.wire.federation import FederatedBundles
from broker.wire.inputs import (
    ACTION_CLASS_MAX,
    CACHE_HITS_MAX,
    ID_MAX,
    REASON_MAX,
    TARGET_MAX,
    check_id,
    check_length,
    is_id,
)
from broker.wire.metadata import (
    DECISION_MD_KEY,
    ERROR_CODE_MD_KEY,
    REQUEST_ID_MD_KEY,
    RETRY_AFTER_MD_KEY,
)

_log = logging.getLogger("credbroker.broker")

_T = TypeVar("_T")


def grpc_status(code: str) -> grpc.StatusCode:
    """The gRPC status of an error code (``broker.errors.ERRORS``); INTERNAL if it has none."""
    name = spec_for(code).grpc_status
    return grpc.StatusCode[name] if name else grpc.StatusCode.INTERNAL


#: Length limits (characters) of the IssueCredential fields, checked before anything is
#: logged or audited; request_id and approval_id must also be ids (``broker.wire.inputs``).
_MAX_FIELD = {"action_class": ACTION_CLASS_MAX, "target": TARGET_MAX, "justification": 2048,
              "request_id": ID_MAX, "approval_id": ID_MAX, "source": 128, "id": 256,
              "summary": 1024, "environment": 64}


#: Cache hits (credential id, request id) recorded lately: a batch a sidecar sends again
#: (its answer was lost) is not recorded twice.
RECORDED_HITS_REMEMBERED = 100_000
#: Reuses recorded per credential at most (a minutes-long credential served from a cache
#: this often is not an agent's normal work; past it, the sidecar asks the broker again).
HITS_PER_CREDENTIAL = 1_000
#: How far a reported serving time may lie ahead of the broker's clock (clock skew).
HIT_CLOCK_SKEW = timedelta(seconds=30)


class ScopeMapHolder:
    """The scope map in force. Swapped atomically as a whole, read without locks."""

    def __init__(self, scope_map: ScopeMap) -> None:
        self._map = scope_map
        self._lock = threading.Lock()
        #: False while Vault does not hold the map in force (start-up sync pending):
        #: Vault might still hold an older, wider policy, so nothing is minted.
        self.vault_synced = True

    @property
    def current(self) -> ScopeMap:
        return self._map

    def replace(self, scope_map: ScopeMap) -> None:
        with self._lock:
            self._map = scope_map


class NoClassAllowsError(PolicyError):
    """No action class of the scope map in force lists the caller: it gets no stream."""

    code = "workload_not_allowed"


def request_from_proto(msg: pb.IssueCredentialRequest) -> CredentialRequest:
    """Validate the wire request's shape (not its policy) and build the core value.

    Every field is bounded here, before the request reaches a log line or the audit log.

    Raises:
        InvalidRequestError: a field is missing, too long or out of range, or request_id /
            approval_id is not an id (``broker.wire.inputs.ID_RULE``).
    """
    for name in ("action_class", "target", "justification", "request_id", "approval_id",
                 "environment"):
        check_length(name, getattr(msg, name), _MAX_FIELD[name])
    check_id("request_id", msg.request_id)
    check_id("approval_id", msg.approval_id)
    if not msg.action_class.strip():
        raise InvalidRequestError("action_class is required, e.g. \"enrichment\"")
    event = None
    if msg.HasField("initiating_event"):
        ev = msg.initiating_event
        if not ev.source.strip() or not ev.id.strip():
            raise InvalidRequestError(
                "initiating_event needs both source and id, e.g. {\"source\": \"splunk\", "
                "\"id\": \"NOTABLE-1234\"}")
        for name in ("source", "id", "summary"):
            check_length(f"initiating_event.{name}", getattr(ev, name), _MAX_FIELD[name])
        event = InitiatingEvent(source=ev.source, id=ev.id, summary=ev.summary)
    if msg.ttl_seconds > HARD_MAX_TTL_SECONDS:
        raise InvalidRequestError(
            f"ttl_seconds {msg.ttl_seconds} is above the broker's hard limit of "
            f"{HARD_MAX_TTL_SECONDS}s; credentials are minutes-long")
    return CredentialRequest(
        action_class=msg.action_class.strip(), target=msg.target,
        initiating_event=event, justification=msg.justification,
        ttl_seconds=int(msg.ttl_seconds), environment=msg.environment.strip(),
    )


class ApprovalClosedError(ApprovalError):
    """The approval a workload waited for was denied or expired."""

    def __init__(self, message: str, *, state: str) -> None:
        super().__init__(message)
        self.code = f"approval_{state}"


def _ts(dt: datetime) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(dt)
    return t


def _vote_to_proto(v: ap.Vote) -> pb.ApprovalVote:
    return pb.ApprovalVote(subject=v.subject, reason=v.reason, at=_ts(v.at), via=v.via)


def approval_to_proto(a: ap.Approval) -> pb.ApprovalInfo:
    req = a.request
    ev = req.initiating_event
    msg = pb.IssueCredentialRequest(action_class=req.action_class, target=req.target,
                                    justification=req.justification,
                                    ttl_seconds=req.ttl_seconds, request_id=a.request_id,
                                    environment=req.environment)
    if ev is not None:
        msg.initiating_event.source, msg.initiating_event.id = ev.source, ev.id
        msg.initiating_event.summary = ev.summary
    return pb.ApprovalInfo(
        id=a.id, state=a.state, spiffe_id=a.spiffe_id, action_class=a.action_class,
        request=msg, request_hash=a.request_hash, approvers=list(a.approvers),
        approvals_required=a.approvals_required,
        votes=[_vote_to_proto(v) for v in a.votes],
        denial=_vote_to_proto(a.denial) if a.denial else None,
        created_at=_ts(a.created_at), expires_at=_ts(a.expires_at), escalated=a.escalated,
        escalation=list(a.escalation),
        review=_vote_to_proto(a.review) if a.review else None,
        credential_id=a.credential_id, owner_team=a.owner_team)


def decision_to_proto(d: Decision) -> pb.Decision:
    out = pb.Decision(
        outcome={Outcome.ALLOW: pb.OUTCOME_ALLOW, Outcome.DENY: pb.OUTCOME_DENY,
                 Outcome.NEEDS_APPROVAL: pb.OUTCOME_NEEDS_APPROVAL}[d.outcome],
        action_class=d.action_class, rule=d.rule, reasons=list(d.reasons),
        escalation=list(d.escalation), scope_map_version=d.scope_map_version,
        source=d.source, risk=d.risk, spiffe_id=str(d.spiffe_id),
        not_reusable=not d.reusable,
    )
    if d.owner is not None:
        out.owner.team, out.owner.contact = d.owner.team, d.owner.contact
    return out


class Authenticator:
    """Turns a gRPC call's peer certificate (and optional JWT-SVID) into a Caller."""

    def __init__(
        self,
        *,
        trust_domain: str,
        audience: str,
        jwt_bundle_for: Callable[[TrustDomain], JwtBundle | None],
        require_jwt: bool,
        clock: Callable[[], datetime],
        federation: FederatedBundles | None = None,
        local_authorities: Callable[[], Sequence[x509.Certificate]] | None = None,
    ) -> None:
        self._td = trust_domain
        self._aud = audience
        self._federation = federation
        self._federated = federation.trust_domains if federation is not None else frozenset()
        self._local_authorities = local_authorities

        def bundle_for(td: TrustDomain) -> JwtBundle | None:
            if federation is not None and td.name in self._federated:
                return federation.jwt_bundle(td.name)
            return jwt_bundle_for(td)

        self._bundle_for = bundle_for
        self._require_jwt = require_jwt
        self._clock = clock
        self._jwt_cache = JwtSvidCache()

    def authenticate(self, context: grpc.ServicerContext) -> Caller:
        """Raises: IdentityError when the caller is not an acceptable workload of our domain."""
        pems = context.auth_context().get("x509_pem_cert")
        if not pems:
            raise IdentityError("no client certificate: call the broker over mTLS with an "
                                "X.509-SVID from the SPIFFE Workload API")
        now = self._clock()
        sid, serial = spiffe_id_from_certificate(pems[0], trust_domain=self._td, now=now,
                                                 federated=self._federated)
        foreign = sid.trust_domain if sid.trust_domain != self._td else ""
        if self._federation is not None:
            # Several trust domains' CAs are TLS roots: the chain must lead to the bundle
            # of the domain the SPIFFE ID names (a vendor's CA never vouches for ours).
            chain = b"".join(context.auth_context().get("x509_pem_cert_chain") or pems[:1])
            authorities = self._federation.x509_authorities(foreign) if foreign else \
                tuple(self._local_authorities() if self._local_authorities else ())
            check_chain(chain, authorities, trust_domain=sid.trust_domain, now=now)
        token = ""
        for key, value in context.invocation_metadata():
            if key == "authorization":
                scheme, _, token = str(value).partition(" ")
                if scheme.lower() != "bearer" or not token:
                    raise IdentityError("authorization metadata must be 'Bearer <JWT-SVID>'")
        if not token:
            if self._require_jwt:
                raise IdentityError("this broker requires a JWT-SVID in 'authorization: Bearer' "
                                    f"for audience {self._aud!r} alongside mTLS")
            return Caller(spiffe_id=sid, x509_serial=serial, federated_from=foreign)
        jti = self._jwt_cache.verify(token, peer=sid, audience=self._aud,
                                     bundle_for=self._bundle_for,
                                     now=self._clock().timestamp())
        return Caller(spiffe_id=sid, x509_serial=serial, jwt_id=jti, federated_from=foreign)


class BrokerService(pb_grpc.CredentialBrokerServicer):  # type: ignore[misc]
    def __init__(
        self,
        *,
        scope_maps: ScopeMapHolder,
        vault: VaultAdapter,
        authenticator: Authenticator,
        audit: AuditTrail,
        responder: Responder,
        desk: ApprovalDesk,
        clock: Callable[[], datetime],
        metrics: Metrics | None = None,
        executor: Executor | None = None,
        environments: Environments | None = None,
    ) -> None:
        """``vault``: the default environment's Vault; ``environments``: every
        environment's (None: ``vault`` is the only one)."""
        self._metrics = metrics or Metrics()
        #: Where the blocking parts of the async methods run (Vault, sqlite, audit fsync).
        self._executor = executor
        self._desk = desk
        self._maps = scope_maps
        self._audit = audit
        self._responder = responder
        self._store = responder.store
        self._vault = vault
        self._vaults = environments or Environments.single(vault)
        self._auth = authenticator
        self._clock = clock
        #: The issuance use case; this servicer only translates messages and errors.
        self.issuer = Issuer(scope_maps=scope_maps, vaults=self._vaults, store=responder.store,
                             budget=StoreBudget(responder.store),  # shared, durable
                             audit=audit, responder=responder, desk=desk, clock=clock,
                             metrics=self._metrics)
        self._hits_lock = threading.Lock()
        self._recorded_hits: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._hits_per_credential: OrderedDict[str, int] = OrderedDict()

    def IssueCredential(
        self, request: pb.IssueCredentialRequest, context: grpc.ServicerContext
    ) -> pb.IssueCredentialResponse:
        # A malformed request_id is refused below (after authentication); until then, and in
        # the log line saying so, the call goes by a fresh id.
        request_id = request.request_id if is_id(request.request_id) else uuid.uuid4().hex
        started = time.perf_counter()
        try:
            with _boundary(context, request_id, "IssueCredential"):
                caller = self._auth.authenticate(context)
                return issuance_response(request_id, self.issuer.issue(
                    caller, request_from_proto(request), request_id,
                    approval_id=request.approval_id, break_glass=request.break_glass))
        finally:
            label = request.action_class if request.action_class in self._maps.current.classes \
                else "(unknown)"  # bounded label values
            self._metrics.issuance_seconds.labels(label).observe(time.perf_counter() - started)
        raise AssertionError("unreachable: _boundary aborts")  # pragma: no cover

    async def AwaitApproval(
        self, request: pb.AwaitApprovalRequest, context: grpc.aio.ServicerContext
    ) -> pb.IssueCredentialResponse:
        """Waits on an asyncio event (no thread); only the issuance itself uses the pool."""
        label = request.approval_id if is_id(request.approval_id) else uuid.uuid4().hex
        async with _aboundary(context, label, "AwaitApproval"):
            caller = self._auth.authenticate(context)
            check_id("approval_id", request.approval_id, required=True)
            a = self._desk.get(request.approval_id)
            if a.spiffe_id != str(caller.spiffe_id):
                raise ApprovalNotFoundError(f"{caller.spiffe_id} has no approval "
                                            f"{request.approval_id!r}")
            a = await self._desk.wait(a.id, min(float(request.wait_seconds), 60.0),
                                      spiffe_id=str(caller.spiffe_id))
            if a.state == ap.PENDING:
                return pb.IssueCredentialResponse(request_id=a.request_id,
                                                  approval=approval_to_proto(a))
            if a.state in (ap.DENIED, ap.EXPIRED):
                why = (f"denied by {a.denial.subject}: {a.denial.reason}" if a.denial
                       else f"no decision before {rfc3339(a.expires_at)}")
                raise ApprovalClosedError(f"approval {a.id} was {a.state} ({why}); nothing was "
                                          "issued", state=a.state)
            # Approved: decided again under the scope map and freezes in force right now.
            return issuance_response(a.request_id, await self._blocking(
                self.issuer.issue, caller, a.request, a.request_id, approval_id=a.id))
        raise AssertionError("unreachable: _aboundary aborts")  # pragma: no cover

    async def _blocking(self, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T:
        """Run blocking work (Vault, sqlite, the audit log's fsync) in the bounded pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          functools.partial(fn, *args, **kwargs))

    def FreezeSelf(self, request: pb.FreezeSelfRequest,
                   context: grpc.ServicerContext) -> pb.FreezeResponse:
        """The caller freezes exactly its own SPIFFE ID (its mTLS SVID); see the proto."""
        with _boundary(context, uuid.uuid4().hex, "FreezeSelf"):
            caller = self._auth.authenticate(context)
            check_length("reason", request.reason, REASON_MAX)
            reason = request.reason.strip()
            if not reason:
                raise InvalidRequestError("reason is required: say why the workload stops "
                                          "itself, e.g. {\"reason\": \"prompt injection "
                                          "suspected\"}; it goes into the audit log")
            done = self.issuer.freeze_self(caller, reason)
            if done.result is None:  # frozen by itself already: nothing new to record
                assert done.existing is not None
                return pb.FreezeResponse(freeze=freeze_to_proto(done.existing))
            return freeze_response(done.result)
        raise AssertionError("unreachable: _boundary aborts")  # pragma: no cover

    async def WatchRevocations(
        self, request: pb.WatchRevocationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RevocationEvent]:
        """An async generator awaiting an asyncio queue: a held stream costs no thread."""
        async with _aboundary(context, uuid.uuid4().hex, "WatchRevocations"):
            caller = self._auth.authenticate(context)
            me = str(caller.spiffe_id)
            scope_map = self._maps.current
            if not any(p.matches(caller.spiffe_id) for cls in scope_map.classes.values()
                       for p in cls.workloads):
                raise NoClassAllowsError(f"no action class of scope map "
                                         f"{scope_map.version[:19]} lists {me}: it has nothing "
                                         "to watch")
            subscription = self._responder.bus.subscribe(me)
            if subscription is None:
                raise TooManyWaitsError(f"{me} already holds the most revocation streams one "
                                        "workload may; close the others (one per sidecar is "
                                        "enough)")
            try:
                frozen = first_freeze(self._responder.freezes, caller.spiffe_id, "")
                live = await self._blocking(self._store.live_ids_of, me, self._clock())
                yield pb.RevocationEvent(sync=pb.RevocationEvent.Sync(
                    live_credential_ids=live,
                    frozen=frozen is not None and frozen.kind == "spiffe_id",
                    reason=frozen.describe() if frozen else "",
                    scope_map_version=self._maps.current.version))
                while True:
                    ev = await subscription.queue.get()
                    if ev is None:
                        return
                    yield _revocation_event(ev)
            finally:
                self._responder.bus.unsubscribe(subscription.id)

    def RevokeCredential(
        self, request: pb.RevokeCredentialRequest, context: grpc.ServicerContext
    ) -> pb.RevokeCredentialResponse:
        with _boundary(context, uuid.uuid4().hex, "RevokeCredential"):
            caller = self._auth.authenticate(context)
            check_id("credential_id", request.credential_id, required=True)
            check_length("reason", request.reason, REASON_MAX)
            row = self._store.get(request.credential_id)
            if row is None or row.spiffe_id != str(caller.spiffe_id):
                # Same answer whether it exists or belongs to another workload.
                raise NotFoundError(f"{caller.spiffe_id} holds no credential "
                                    f"{request.credential_id}; an agent may only hand back its own")
            if row.state == "revoked" and not row.revoke_pending:
                return pb.RevokeCredentialResponse(credential_id=request.credential_id,
                                                   already_dead=True)
            reason = request.reason[:500] or "handed back by the workload"
            outcome = self._responder.revoke_one(row, by=str(caller.spiffe_id), reason=reason,
                                                 selector="hand-back")
            # The revocation has happened (or is queued): record it even if the log is down.
            self._audit.append_or_queue(
                "credential.revoked", credential_id=request.credential_id,
                request_id=row.request_id, spiffe_id=row.spiffe_id,
                action_class=row.action_class, by=str(caller.spiffe_id), selector="hand-back",
                reason=reason, result=outcome.result,
                **({"environment": row.environment} if row.environment else {}))
            if outcome.result == "pending":
                raise VaultUnavailableError(
                    f"Vault did not confirm revoking {request.credential_id} ({outcome.error}); "
                    "the broker retries until it does")
            if outcome.result == "failed":
                raise VaultError(outcome.error)
            _log.info("credential_id=%s handed back by %s reason=%r", request.credential_id,
                      caller.spiffe_id, reason[:200])
            return pb.RevokeCredentialResponse(credential_id=request.credential_id,
                                               already_dead=outcome.result == "already_dead")
        raise AssertionError("unreachable: _boundary aborts")  # pragma: no cover


    def ReportCacheHits(
        self, request: pb.ReportCacheHitsRequest, context: grpc.ServicerContext
    ) -> pb.ReportCacheHitsResponse:
        with _boundary(context, uuid.uuid4().hex, "ReportCacheHits"):
            caller = self._auth.authenticate(context)
            if len(request.hits) > CACHE_HITS_MAX:
                raise InvalidRequestError(f"{len(request.hits)} cache hits in one call; at most "
                                          f"{CACHE_HITS_MAX}")
            return self._record_hits(caller, request.hits)
        raise AssertionError("unreachable: _boundary aborts")  # pragma: no cover

    def _record_hits(self, caller: Caller, hits: Iterable[pb.CacheHit]
                     ) -> pb.ReportCacheHitsResponse:
        """Append one ``credential.reused`` record per acceptable hit, in order.

        Raises: AuditError (hits before the failing one are recorded, and remembered, so
            a resent batch records each exactly once).
        """
        me = str(caller.spiffe_id)
        out = pb.ReportCacheHitsResponse()
        batch: list[tuple[str, dict[str, object]]] = []
        keys: list[tuple[str, str]] = []
        with self._hits_lock:  # a resent batch must not race its own first attempt
            for index, hit in enumerate(hits):
                try:
                    fields = self._reuse_fields(me, hit)
                except CredbrokerError as exc:
                    out.rejected.add(index=index, reason=str(exc))
                    continue
                key = (hit.credential_id, hit.request_id)
                if key in self._recorded_hits:
                    out.duplicates += 1
                    continue
                used = self._hits_per_credential.get(hit.credential_id, 0)
                if used >= HITS_PER_CREDENTIAL:
                    out.rejected.add(index=index, reason=(
                        f"credential {hit.credential_id} already has {used} reuses on record; "
                        "ask the broker for a new credential"))
                    continue
                self._hits_per_credential[hit.credential_id] = used + 1
                self._recorded_hits[key] = None  # claimed: given back below if not written
                keys.append(key)
                batch.append(("credential.reused", {
                    **fields, "proof": {"x509_serial": caller.x509_serial,
                                        "jwt_id": caller.jwt_id}}))
            while len(self._recorded_hits) > RECORDED_HITS_REMEMBERED:
                self._recorded_hits.popitem(last=False)
            while len(self._hits_per_credential) > RECORDED_HITS_REMEMBERED:
                self._hits_per_credential.popitem(last=False)
        try:  # one group commit for the batch, outside the lock
            self._audit.append_many(batch)
        except AuditError:
            with self._hits_lock:
                for key in keys:
                    self._recorded_hits.pop(key, None)
                    n = self._hits_per_credential.get(key[0], 0)
                    if n:
                        self._hits_per_credential[key[0]] = n - 1
            raise
        out.recorded += len(batch)
        if out.rejected:
            _log.warning("%s reported %d cache hit(s) the broker did not record: %s", me,
                         len(out.rejected), "; ".join(f"#{r.index}: {r.reason}"
                                                      for r in out.rejected[:5]))
        return out

    def _reuse_fields(self, me: str, hit: pb.CacheHit) -> dict[str, object]:
        """The audit fields of one reported cache hit.

        Raises:
            InvalidRequestError: an id or a request field is malformed or too long, or
                served_at is not a time.
            NotFoundError: the credential is not the caller's, or was minted for another
                class or target than the request names.
        """
        check_id("credential_id", hit.credential_id, required=True)
        check_id("request_id", hit.request_id, required=True)
        req = request_from_proto(hit.request)
        try:
            served = hit.served_at.ToDatetime(tzinfo=UTC) if hit.HasField("served_at") \
                else self._clock()
        except (ValueError, OverflowError):
            raise InvalidRequestError("served_at is not a valid time") from None
        row = self._store.get(hit.credential_id)
        if row is None or row.spiffe_id != me or row.state not in ("live", "revoked"):
            raise NotFoundError(f"{me} holds no credential {hit.credential_id}")
        if row.expires_at is None or not (
                row.issued_at - HIT_CLOCK_SKEW <= served <= row.expires_at
                and served <= self._clock() + HIT_CLOCK_SKEW):
            raise InvalidRequestError(
                f"served_at {rfc3339(served)} is outside the life of credential "
                f"{hit.credential_id}: a cache serves a credential only while it lives")
        if (req.action_class, req.target) != (row.action_class, row.target):
            raise NotFoundError(f"credential {hit.credential_id} was not minted for the action "
                                "class and target the request names")
        return {"request_id": hit.request_id, "credential_id": hit.credential_id,
                "minted_request_id": row.request_id, "spiffe_id": me,
                "action_class": row.action_class, "target": row.target,
                "request": request_to_json(req), "served_at": rfc3339(served)}


def issuance_response(request_id: str, result: Issued | PendingApproval
                      ) -> pb.IssueCredentialResponse:
    """The answer to an issuance: the credential, or the approval to wait for."""
    if isinstance(result, PendingApproval):
        return pb.IssueCredentialResponse(request_id=request_id,
                                          decision=decision_to_proto(result.decision),
                                          approval=approval_to_proto(result.approval))
    minted = result.credential
    expires = Timestamp()
    expires.FromDatetime(minted.expires_at)
    return pb.IssueCredentialResponse(
        request_id=request_id,
        credential=pb.Credential(
            credential_id=minted.accessor, token=minted.token, expires_at=expires,
            policies=list(minted.policies), ttl_seconds=minted.ttl_seconds,
            environment=result.environment),
        decision=decision_to_proto(result.decision),
        approval=approval_to_proto(result.approval) if result.approval else None,
    )


def freeze_to_proto(f: Freeze) -> pb.FreezeInfo:
    return pb.FreezeInfo(id=f.id, kind=f.kind, pattern=f.pattern, reason=f.reason, by=f.by,
                         created_at=_ts(f.created_at))


def freeze_response(res: FreezeResult) -> pb.FreezeResponse:
    """The answer to a freeze (a responder's or a workload's own): what is done, what pends."""
    return pb.FreezeResponse(freeze=freeze_to_proto(res.freeze),
                             credentials_matched=res.credentials_matched,
                             vault_entities_disabled=res.entities_disabled,
                             vault_policy_frozen=res.policy_frozen,
                             vault_enforced_ms=res.enforced_ms,
                             vault_pending=res.vault_pending,
                             vault_error=res.vault_error)


def _revocation_event(ev: BusEvent) -> pb.RevocationEvent:
    if ev.scope_map_version:
        return pb.RevocationEvent(scope_map=pb.RevocationEvent.ScopeMapInForce(
            version=ev.scope_map_version))
    if ev.credential_ids:
        return pb.RevocationEvent(revoked=pb.RevocationEvent.Revoked(
            credential_ids=list(ev.credential_ids)))
    return pb.RevocationEvent(frozen=pb.RevocationEvent.Frozen(
        action_class=ev.action_class, identity=bool(ev.identity_pattern), reason=ev.reason,
        by=ev.by))


def _failure(exc: Exception, request_id: str, method: str
             ) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str | bytes], ...]]:
    """The gRPC status, details and trailing metadata that answer ``exc`` (logged here)."""
    if isinstance(exc, DeniedByPolicy):
        d = exc.decision
        assert d.deny_code is not None  # only denials are raised; approvals answer 202
        code = d.deny_code.value
        trailer: list[tuple[str, str | bytes]] = [
            (DECISION_MD_KEY, decision_to_proto(d).SerializeToString()),
            (ERROR_CODE_MD_KEY, code),
            (REQUEST_ID_MD_KEY, request_id),
        ]
        if d.retry_after_seconds:
            trailer.append((RETRY_AFTER_MD_KEY, str(d.retry_after_seconds)))
        return grpc_status(code), "; ".join(d.reasons), tuple(trailer)
    if isinstance(exc, CredbrokerError):
        _log.warning("request_id=%s %s failed: %s: %s", request_id, method, exc.code, exc)
        trailer = [(ERROR_CODE_MD_KEY, exc.code), (REQUEST_ID_MD_KEY, request_id)]
        if exc.retry_after_seconds:
            trailer.append((RETRY_AFTER_MD_KEY, str(exc.retry_after_seconds)))
        return grpc_status(exc.code), str(exc), tuple(trailer)
    _log.error("request_id=%s %s failed unexpectedly", request_id, method, exc_info=exc)
    return (grpc.StatusCode.INTERNAL,
            f"the broker failed unexpectedly; request id {request_id} is in its log",
            ((ERROR_CODE_MD_KEY, "internal"), (REQUEST_ID_MD_KEY, request_id)))


@contextmanager
def _boundary(context: grpc.ServicerContext, request_id: str, method: str) -> Iterator[None]:
    """Translate our errors into gRPC statuses, once (``broker.errors.ERRORS``).

    The trailing metadata carries the stable code (``credbroker-error-code``), the request
    id, and, when the error or decision knows it, ``credbroker-retry-after`` (seconds).
    Unexpected errors become INTERNAL. For the methods that run in the worker pool.
    """
    try:
        yield
    except Exception as exc:
        status, details, trailer = _failure(exc, request_id, method)
        context.set_trailing_metadata(trailer)
        context.abort(status, details)


@asynccontextmanager
async def _aboundary(context: grpc.aio.ServicerContext, request_id: str, method: str
                     ) -> AsyncIterator[None]:
    """:func:`_boundary` for the async methods (same answers)."""
    try:
        yield
    except Exception as exc:
        status, details, trailer = _failure(exc, request_id, method)
        context.set_trailing_metadata(trailer)
        await context.abort(status, details)
