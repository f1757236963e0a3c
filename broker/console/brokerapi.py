"""The console's client of the broker's admin and approvals APIs: grpc.aio over mTLS.

The console connects with its own X.509-SVID (which the broker must list as an
``--admin-id``); every state-changing call also carries the signed-in person's ID
token in ``authorization-person`` metadata, so the broker verifies and records the
person (:mod:`broker.app.people`). The channel is rebuilt when the SVID rotates.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from spiffe import X509Source

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.app.people import PERSON_MD_KEY
from broker.wire.metadata import ERROR_CODE_MD_KEY
from broker.wire.tls import KEEPALIVE, pem_material


@dataclass
class BrokerRefused(Exception):
    """The broker answered with an error: its stable code and its message (never a token)."""

    code: str
    message: str
    status: str

    def __str__(self) -> str:
        return self.message


def _person(id_token: str) -> tuple[tuple[str, str], ...]:
    return ((PERSON_MD_KEY, f"Bearer {id_token}"),)


class BrokerApi:
    def __init__(self, *, workload_api: str, target: str, server_dns_name: str,
                 timeout: float = 30.0) -> None:
        sock = workload_api if workload_api.startswith("unix:") else "unix:" + workload_api
        self._source = X509Source(socket_path=sock, timeout_in_seconds=10)
        self._target = target
        self._dns = server_dns_name
        self._timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._serial = -1

    @property
    def spiffe_id(self) -> str:
        return str(self._source.svid.spiffe_id)

    def _chan(self) -> grpc.aio.Channel:
        m = pem_material(self._source)
        if self._channel is None or m.serial != self._serial:
            creds = grpc.ssl_channel_credentials(root_certificates=m.bundle, private_key=m.key,
                                                 certificate_chain=m.chain)
            # The old channel's calls finish; it is garbage-collected when idle.
            self._channel = grpc.aio.secure_channel(
                self._target, creds,
                options=[("grpc.ssl_target_name_override", self._dns), *KEEPALIVE])
            self._serial = m.serial
        return self._channel

    def admin(self) -> pb_grpc.CredentialAdminStub:
        return pb_grpc.CredentialAdminStub(self._chan())

    def approvals(self) -> pb_grpc.ApprovalsStub:
        return pb_grpc.ApprovalsStub(self._chan())

    @staticmethod
    def refused(err: grpc.aio.AioRpcError) -> BrokerRefused:
        md = dict(err.trailing_metadata() or ())
        return BrokerRefused(code=str(md.get(ERROR_CODE_MD_KEY, "")),
                             message=err.details() or err.code().name, status=err.code().name)

    async def _unary(self, call: object) -> object:
        try:
            return await call  # type: ignore[misc]
        except grpc.aio.AioRpcError as err:
            raise self.refused(err) from None

    # -- reads (the console's SVID only)

    async def pending(self, *, review: bool = False) -> list[pb.ApprovalInfo]:
        resp = await self._unary(self.approvals().ListApprovals(
            pb.ListApprovalsRequest(review=review), timeout=self._timeout))
        return list(resp.approvals)  # type: ignore[attr-defined]

    async def credentials(self, selector: pb.Selector) -> list[pb.CredentialInfo]:
        resp = await self._unary(self.admin().ListCredentials(selector, timeout=self._timeout))
        return list(resp.credentials)  # type: ignore[attr-defined]

    async def freezes(self) -> list[pb.FreezeInfo]:
        resp = await self._unary(self.admin().ListFreezes(pb.ListFreezesRequest(),
                                                          timeout=self._timeout))
        return list(resp.freezes)  # type: ignore[attr-defined]

    # -- acts (with the person's ID token)

    async def decide(self, what: str, approval_id: str, reason: str,
                     id_token: str) -> pb.ApprovalInfo:
        """``what``: Approve, Deny or SignOff."""
        fn = getattr(self.approvals(), what)
        resp = await self._unary(fn(pb.ApprovalDecisionRequest(approval_id=approval_id,
                                                               reason=reason),
                                    metadata=_person(id_token), timeout=self._timeout))
        assert isinstance(resp, pb.ApprovalInfo)
        return resp

    async def revoke(self, selector: pb.Selector, reason: str, id_token: str) \
            -> pb.RevokeSummary:
        call = self.admin().RevokeCredentials(
            pb.RevokeCredentialsRequest(selector=selector, reason=reason),
            metadata=_person(id_token), timeout=600)
        summary = pb.RevokeSummary()
        try:
            async for p in call:
                if p.HasField("summary"):
                    summary = p.summary
        except grpc.aio.AioRpcError as err:
            raise self.refused(err) from None
        return summary

    async def freeze(self, *, spiffe_id: str, action_class: str, reason: str,
                     id_token: str) -> pb.FreezeResponse:
        resp = await self._unary(self.admin().Freeze(
            pb.FreezeRequest(spiffe_id=spiffe_id, action_class=action_class, reason=reason),
            metadata=_person(id_token), timeout=60))
        assert isinstance(resp, pb.FreezeResponse)
        return resp

    async def unfreeze(self, *, spiffe_id: str, action_class: str, reason: str,
                       id_token: str) -> pb.UnfreezeResponse:
        resp = await self._unary(self.admin().Unfreeze(
            pb.UnfreezeRequest(spiffe_id=spiffe_id, action_class=action_class, reason=reason),
            metadata=_person(id_token), timeout=60))
        assert isinstance(resp, pb.UnfreezeResponse)
        return resp

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
        self._source.close()
