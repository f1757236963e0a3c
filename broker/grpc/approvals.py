"""The Approvals gRPC service: list, approve, deny, and sign off break-glass uses.

Listing needs only an admin SVID (or an approval bot's). Approving, denying and
signing off need a person: their ID token in ``authorization-person`` metadata
(as the CLI sends it) or in the request's ``id_token`` field; an approval bot
without a token approves as itself. Who may decide is the approval rule's
business (approver groups, break-glass reviewers).
"""

from __future__ import annotations

import logging

import grpc

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.adapters.approvers import ApproverTokenError, OidcVerifier
from broker.app.approval_desk import ApprovalDesk
from broker.app.people import LOGIN_HINT, PERSON_MD_KEY, person_token, verify_person
from broker.core.approvals import Approver
from broker.errors import InvalidRequestError, PolicyError
from broker.grpc.service import Authenticator, _boundary, approval_to_proto
from broker.wire.inputs import ID_TOKEN_MAX, REASON_MAX, check_id, check_length, is_id

_log = logging.getLogger("credbroker.approvals")


class NotApproverClientError(PolicyError):
    code = "not_admin"


class ApprovalsService(pb_grpc.ApprovalsServicer):  # type: ignore[misc]
    """Callers connect with an admin SVID (a person's tool, which must send that person's
    ID token) or an approval bot's SVID (which approves as itself)."""

    def __init__(self, *, desk: ApprovalDesk, authenticator: Authenticator,
                 verifier: OidcVerifier, admins: frozenset[str]) -> None:
        self._desk = desk
        self._auth = authenticator
        self._verifier = verifier
        self._admins = admins

    def _client(self, context: grpc.ServicerContext) -> str:
        caller = str(self._auth.authenticate(context).spiffe_id)
        if caller not in self._admins and self._verifier.bot(caller) is None:
            raise NotApproverClientError(
                f"{caller} may not use the approvals API: connect with an admin SVID (and your "
                "ID token) or as a configured approval bot")
        return caller

    def _approver(self, caller: str, id_token: str, what: str) -> Approver:
        """The person (or approval bot) deciding.

        Raises: ApproverTokenError (no ID token from a person's tool, or a refused one;
        UNAUTHENTICATED with the login hint).
        """
        bot = self._verifier.bot(caller)
        if bot is not None and not id_token:
            return bot
        if not id_token:
            raise ApproverTokenError(f"to {what}, the broker needs to know who you are: "
                                     f"{LOGIN_HINT}")
        return verify_person(self._verifier, id_token)

    @staticmethod
    def _token(request: pb.ApprovalDecisionRequest, context: grpc.ServicerContext) -> str:
        """The person's ID token: metadata or the request field (one of them, or both equal).

        Raises: InvalidRequestError (malformed metadata, or two different tokens).
        """
        from_md = person_token(context)
        if from_md and request.id_token and from_md != request.id_token:
            raise InvalidRequestError(f"two different ID tokens ({PERSON_MD_KEY} metadata and "
                                      "the id_token field): send one")
        return from_md or str(request.id_token)

    def ListApprovals(self, request: pb.ListApprovalsRequest,
                      context: grpc.ServicerContext) -> pb.ListApprovalsResponse:
        with _boundary(context, "approvals", "ListApprovals"):
            self._client(context)
            items = self._desk.awaiting_review() if request.review else self._desk.pending()
            return pb.ListApprovalsResponse(approvals=[approval_to_proto(a) for a in items])
        raise AssertionError("unreachable")  # pragma: no cover

    def _decide(self, request: pb.ApprovalDecisionRequest, context: grpc.ServicerContext,
                what: str) -> pb.ApprovalInfo:
        label = request.approval_id if is_id(request.approval_id) else "approvals"
        with _boundary(context, label, what):
            caller = self._client(context)
            # Bounded before the token is parsed or anything is logged or audited.
            check_id("approval_id", request.approval_id, required=True)
            check_length("reason", request.reason, REASON_MAX)
            check_length("id_token", request.id_token, ID_TOKEN_MAX)
            what_text = {"Approve": "approve", "Deny": "deny",
                         "SignOff": "sign off a break-glass use"}[what]
            who = self._approver(caller, self._token(request, context), what_text)
            if what == "SignOff":
                a = self._desk.sign_off(request.approval_id, who, request.reason)
            else:
                a = self._desk.decide(request.approval_id, who, request.reason,
                                      approve=what == "Approve")
            _log.warning("%s %s approval %s (%s for %s): %s", who.subject, what.lower(), a.id,
                         a.action_class, a.spiffe_id, request.reason)
            return approval_to_proto(a)
        raise AssertionError("unreachable")  # pragma: no cover

    def Approve(self, request: pb.ApprovalDecisionRequest,
                context: grpc.ServicerContext) -> pb.ApprovalInfo:
        return self._decide(request, context, "Approve")

    def Deny(self, request: pb.ApprovalDecisionRequest,
             context: grpc.ServicerContext) -> pb.ApprovalInfo:
        return self._decide(request, context, "Deny")

    def SignOff(self, request: pb.ApprovalDecisionRequest,
                context: grpc.ServicerContext) -> pb.ApprovalInfo:
        return self._decide(request, context, "SignOff")
