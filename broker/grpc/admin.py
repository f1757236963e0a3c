"""The CredentialAdmin gRPC service: list, mass-revoke, freeze, unfreeze. Administrators only.

Listing needs only an admin SVID. Revoking, freezing and unfreezing also need a
person in a responder group (their ID token in ``authorization-person``), or a
caller configured as automation: see :mod:`broker.app.people`. A team-scoped responder
(``--team-scope``) acts only on its teams' classes, agents and credentials
(:mod:`broker.core.teams`); a refusal is audited (``responder.refused``) with who tried.
Listing is not scoped: every responder sees everything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.adapters.registry import CredentialRow
from broker.app.people import Actor, NotResponderError, PersonRequiredError, ResponderGate
from broker.app.responder import Responder
from broker.core import teams as team_scope
from broker.core.revocation import Selector, check_known, freeze_target
from broker.errors import AuditError, InvalidRequestError, OutsideTeamError, PolicyError
from broker.grpc.service import Authenticator, _boundary, freeze_response, freeze_to_proto
from broker.wire.inputs import (
    ACTION_CLASS_MAX,
    REASON_MAX,
    SPIFFE_ID_MAX,
    TARGET_MAX,
    check_ids,
    check_length,
)

_log = logging.getLogger("credbroker.admin")


class NotAdminError(PolicyError):
    code = "not_admin"


def _target(request: pb.FreezeRequest | pb.UnfreezeRequest) -> str:
    """What a freeze or unfreeze names, for a refusal's record (each part cut to its
    field's bound: the lengths are checked only after the caller is known)."""
    parts = ([f"identity {request.spiffe_id[:SPIFFE_ID_MAX]}"] if request.spiffe_id else []
             ) + ([f"action class {request.action_class[:ACTION_CLASS_MAX]}"]
                  if request.action_class else [])
    return ", ".join(parts)


def _ts(dt: datetime | None) -> Timestamp:
    t = Timestamp()
    if dt is not None:
        t.FromDatetime(dt)
    return t


def selector_from_proto(sel: pb.Selector,
                        resolve: Callable[[str], str] = lambda name: name,
                        default_environment: str = "") -> Selector:
    """``resolve`` maps an environment name to the one credentials are recorded with;
    credentials recorded with none were minted in ``default_environment``.

    Raises: InvalidRequestError (empty selector, a field too long or a malformed credential
    id, malformed pattern, since > until); UnknownEnvironmentError (from ``resolve``).
    """
    check_length("selector spiffe_id", sel.spiffe_id, SPIFFE_ID_MAX)
    check_length("selector action_class", sel.action_class, ACTION_CLASS_MAX)
    check_length("selector target", sel.target, TARGET_MAX)
    check_length("selector environment", sel.environment, ACTION_CLASS_MAX)
    check_ids("selector credential_id", sel.credential_ids)
    return Selector.build(
        spiffe_id=sel.spiffe_id, action_class=sel.action_class, target=sel.target,
        environment=resolve(sel.environment) if sel.environment else "",
        default_environment=default_environment,
        since=sel.since.ToDatetime(tzinfo=UTC) if sel.HasField("since") else None,
        until=sel.until.ToDatetime(tzinfo=UTC) if sel.HasField("until") else None,
        credential_ids=list(sel.credential_ids), all=sel.all)


def row_to_proto(r: CredentialRow, event: tuple[str, str] | None = None) -> pb.CredentialInfo:
    info = pb.CredentialInfo(
        credential_id=r.credential_id, spiffe_id=r.spiffe_id, action_class=r.action_class,
        target=r.target, request_id=r.request_id, issued_at=_ts(r.issued_at),
        expires_at=_ts(r.expires_at),
        state="revoke_pending" if r.revoke_pending else r.state, environment=r.environment)
    if event is not None:
        info.initiating_event.CopyFrom(pb.InitiatingEvent(source=event[0], id=event[1]))
    return info


class AdminService(pb_grpc.CredentialAdminServicer):  # type: ignore[misc]
    def __init__(self, *, responder: Responder, authenticator: Authenticator,
                 admins: frozenset[str], clock: Callable[[], datetime],
                 gate: ResponderGate) -> None:
        self._r = responder
        self._auth = authenticator
        self._admins = admins
        self._clock = clock
        self._gate = gate

    def _admin(self, context: grpc.ServicerContext) -> str:
        """The caller's SPIFFE ID: an administrator or configured automation.

        Raises: IdentityError (not an acceptable workload), NotAdminError.
        """
        return self._admin_id(str(self._auth.authenticate(context).spiffe_id))

    def _admin_id(self, caller: str) -> str:
        """``caller`` if it is an administrator or configured automation. Raises: NotAdminError."""
        if caller not in self._admins and caller not in self._gate.automation:
            raise NotAdminError(f"{caller} is not a credbroker administrator; only the SPIFFE IDs "
                                "in the broker's --admin-id list may revoke or freeze")
        return caller

    def _actor(self, context: grpc.ServicerContext, what: str, target: str = "") -> Actor:
        """Who this act is recorded as. A refusal by who the caller proved to be (its SVID,
        or the person's verified ID token) is audited as ``responder.refused`` first: an
        attempt to revoke or freeze is an act on the record too.

        Raises: as _admin and ResponderGate.actor.
        """
        caller = str(self._auth.authenticate(context).spiffe_id)
        try:
            return self._gate.actor(context, self._admin_id(caller), what)
        except NotResponderError as exc:
            p = exc.person
            self._refused(what, target, by=p.subject, error=exc,
                          actor={"kind": "person", "client": caller, "issuer": p.issuer,
                                 "groups": list(p.groups)})
            raise
        except (NotAdminError, PersonRequiredError) as exc:
            self._refused(what, target, by=caller, error=exc, actor={"kind": "workload",
                                                             "client": caller})
            raise

    def _refused(self, act: str, target: str, *, by: str, error: Exception,
                 actor: Mapping[str, object]) -> None:
        """Audit and log a refused responder act. Nothing was done, so a record the log
        cannot take now is logged, not queued: a caller refused over and over must not
        grow the broker's memory while the log is down."""
        try:
            self._r.audit.append("responder.refused", act=act, target=target, by=by,
                                 actor=dict(actor), error=str(error))
        except AuditError as exc:
            _log.error("a refused %s by %s could not be recorded (%s)", act, by, exc)
        _log.warning("%s refused: %s", by, error)

    def _default_env(self) -> str:
        """Where credentials recorded without an environment were minted ("": no
        environments declared)."""
        return self._r.vaults.default if self._r.vaults.declared else ""

    def _known(self, *, spiffe_id: str, action_class: str) -> None:
        """Raises: InvalidRequestError naming what exists, for a class or identity pattern
        neither the scope map nor any live credential knows (a typo is not "all clear")."""
        if not spiffe_id and not action_class:
            return
        scope_map = self._r.scope_map
        workloads = [w for c in scope_map.classes.values() for w in c.workloads]
        try:
            check_known(spiffe_id=spiffe_id, action_class=action_class,
                        classes=scope_map.classes, workloads=workloads, held=())
        except InvalidRequestError:  # not in the map: perhaps only live credentials know it
            held = [(r.spiffe_id, r.action_class)
                    for r in self._r.store.live(Selector(all=True), self._clock())]
            check_known(spiffe_id=spiffe_id, action_class=action_class,
                        classes=scope_map.classes, workloads=workloads, held=held)

    def _in_team(self, actor: Actor, act: str, target: str, check: Callable[[], None]) -> None:
        """Run ``check`` (a :mod:`broker.core.teams` check) for a team-scoped actor; a
        refusal is audited with who tried, then raised.

        Raises: OutsideTeamError (PERMISSION_DENIED), naming which team owns what.
        """
        if actor.teams is None:
            return
        try:
            check()
        except OutsideTeamError as exc:
            self._refused(act, target, by=actor.by, error=exc, actor=actor.audit())
            raise

    def _check_target(self, actor: Actor, act: str, spiffe_id: str, action_class: str,
                      held: Sequence[CredentialRow] | None = None) -> None:
        """A freeze's or unfreeze's target within the actor's teams.

        Raises: InvalidRequestError (neither or both given, a bad pattern), OutsideTeamError.
        """
        if actor.teams is None:
            return
        kind, pattern = freeze_target(spiffe_id, action_class)
        scope_map = self._r.scope_map
        if kind == "action_class":
            self._in_team(actor, act, f"action class {pattern}", lambda: team_scope.check_class(
                scope_map, actor.teams, pattern, what=f"{act} class {pattern}"))
            return
        rows = held if held is not None else self._r.store.live(Selector(all=True),
                                                                  self._clock())
        self._in_team(actor, act, f"identity {pattern}", lambda: team_scope.check_identity(
            scope_map, actor.teams, pattern, held=[(r.spiffe_id, r.action_class) for r in rows],
            what=act))

    @staticmethod
    def _reason(reason: str) -> str:
        """Raises: InvalidRequestError (no reason, or longer than REASON_MAX characters)."""
        check_length("--reason", reason, REASON_MAX)
        if not reason.strip():
            raise InvalidRequestError("--reason is required: say why, it goes into the audit "
                                      "log")
        return reason.strip()

    @staticmethod
    def _freeze_target(request: pb.FreezeRequest | pb.UnfreezeRequest) -> None:
        """Raises: InvalidRequestError (spiffe_id or action_class too long)."""
        check_length("spiffe_id", request.spiffe_id, SPIFFE_ID_MAX)
        check_length("action_class", request.action_class, ACTION_CLASS_MAX)

    def ListCredentials(self, request: pb.Selector,
                        context: grpc.ServicerContext) -> pb.ListCredentialsResponse:
        with _boundary(context, "admin", "ListCredentials"):
            self._admin(context)
            selector = selector_from_proto(request, self._r.vaults.resolve, self._default_env())
            self._known(spiffe_id=request.spiffe_id, action_class=request.action_class)
            rows = self._r.store.live(selector, self._clock())
            events = self._r.store.initiating_events(r.credential_id for r in rows)
            return pb.ListCredentialsResponse(credentials=[
                row_to_proto(r, events.get(r.credential_id)) for r in rows])
        raise AssertionError("unreachable")  # pragma: no cover

    def RevokeCredentials(self, request: pb.RevokeCredentialsRequest,
                          context: grpc.ServicerContext) -> Iterator[pb.RevokeProgress]:
        with _boundary(context, "admin", "RevokeCredentials"):
            actor = self._actor(context, "revoke credentials")
            by = actor.by
            reason = self._reason(request.reason)
            selector = selector_from_proto(request.selector, self._r.vaults.resolve,
                                           self._default_env())
            self._known(spiffe_id=request.selector.spiffe_id,
                        action_class=request.selector.action_class)
            rows = self._r.store.live(selector, self._clock())
            if actor.teams is not None:
                scope_map, target = self._r.scope_map, selector.describe()
                if request.selector.action_class:
                    cls = request.selector.action_class
                    self._in_team(actor, "revoke", target, lambda: team_scope.check_class(
                        scope_map, actor.teams, cls, what=f"revoke credentials of class {cls}"))
                self._in_team(actor, "revoke", target, lambda: team_scope.check_credentials(
                    scope_map, actor.teams, [(r.spiffe_id, r.action_class) for r in rows],
                    what=f"revoke {len(rows)} credential(s) selected by {target}"))
            _log.warning("%s (via %s) revokes %d credential(s) selected by %s: %s", by,
                         actor.client, len(rows), selector.describe(), reason)
            summary = pb.RevokeSummary()
            for done, o in enumerate(self._r.revoke(rows, by=by, reason=reason,
                                                    selector=selector.describe(),
                                                    actor=actor.audit()), 1):
                if o.result == "revoked":
                    summary.revoked += 1
                elif o.result == "already_dead":
                    summary.already_dead += 1
                elif o.result == "pending":
                    summary.pending += 1
                else:
                    summary.failed += 1
                    summary.failed_ids.append(o.credential_id)
                yield pb.RevokeProgress(done=done, total=len(rows), credential_id=o.credential_id,
                                        result=o.result, error=o.error)
            yield pb.RevokeProgress(done=len(rows), total=len(rows), summary=summary)
            return
        raise AssertionError("unreachable")  # pragma: no cover

    def Freeze(self, request: pb.FreezeRequest,
               context: grpc.ServicerContext) -> pb.FreezeResponse:
        with _boundary(context, "admin", "Freeze"):
            actor = self._actor(context, "freeze", _target(request))
            by = actor.by
            self._freeze_target(request)
            self._known(spiffe_id=request.spiffe_id, action_class=request.action_class)
            self._check_target(actor, "freeze", request.spiffe_id, request.action_class)
            res = self._r.freeze(
                spiffe_id=request.spiffe_id, action_class=request.action_class,
                reason=self._reason(request.reason), by=by, actor=actor.audit())
            fz = res.freeze
            _log.warning("%s froze %s %s (%d live credentials; %s): %s", by, fz.kind,
                         fz.pattern, res.credentials_matched,
                         f"Vault enforced in {res.enforced_ms:.1f} ms" if not res.vault_pending
                         else "Vault enforcement PENDING", fz.reason)
            return freeze_response(res)
        raise AssertionError("unreachable")  # pragma: no cover

    def Unfreeze(self, request: pb.UnfreezeRequest,
                 context: grpc.ServicerContext) -> pb.UnfreezeResponse:
        with _boundary(context, "admin", "Unfreeze"):
            actor = self._actor(context, "unfreeze", _target(request))
            self._freeze_target(request)
            self._check_target(actor, "unfreeze", request.spiffe_id, request.action_class)
            try:
                lifted = self._r.unfreeze(spiffe_id=request.spiffe_id,
                                          action_class=request.action_class,
                                          reason=self._reason(request.reason), by=actor.by,
                                          actor=actor.audit())
            except PersonRequiredError as exc:  # automation lifting an automatic freeze
                self._refused("unfreeze", _target(request), by=actor.by, error=exc,
                              actor=actor.audit())
                raise
            return pb.UnfreezeResponse(lifted=[freeze_to_proto(f) for f in lifted])
        raise AssertionError("unreachable")  # pragma: no cover

    def ListFreezes(self, request: pb.ListFreezesRequest,
                    context: grpc.ServicerContext) -> pb.ListFreezesResponse:
        with _boundary(context, "admin", "ListFreezes"):
            self._admin(context)
            return pb.ListFreezesResponse(freezes=[freeze_to_proto(f) for f in self._r.freezes])
        raise AssertionError("unreachable")  # pragma: no cover

