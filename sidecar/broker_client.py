"""The sidecar's gRPC client to the broker (``grpc.aio``): mTLS with our X.509-SVID, plus a
JWT-SVID.

Translates gRPC failures into :class:`BrokerCallError`, which carries the HTTP
status and stable code the agent sees: the code from the broker's
``credbroker-error-code`` trailer, its HTTP status from ``broker.errors.ERRORS``
(README, "Errors").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from spiffe import JwtSource, X509Source

from broker._proto.credbroker.v1 import broker_pb2 as pb
from broker._proto.credbroker.v1 import broker_pb2_grpc as pb_grpc
from broker.errors import (
    ERRORS,
    FALLBACK_CODES,
    BrokerUnavailableError,
    WorkloadApiError,
)
from broker.wire.federation import FederatedBundles
from broker.wire.loop import LoopThread
from broker.wire.metadata import DECISION_MD_KEY, ERROR_CODE_MD_KEY, RETRY_AFTER_MD_KEY
from broker.wire.tls import (
    AioRotatingChannel,
    PemMaterial,
    channel_credentials,
    diagnose_handshake,
    pem_material,
)
from sidecar.config import SidecarConfig

_log = logging.getLogger("credbroker.sidecar")


def http_status(code: str) -> int:
    """The HTTP status the agent gets for an error code (500 for one the table lacks)."""
    spec = ERRORS.get(code)
    return spec.http_status if spec is not None and spec.http_status is not None else 500


@dataclass
class BrokerCallError(Exception):
    http_status: int
    code: str
    message: str
    decision: dict[str, Any] | None = field(default=None)
    #: Seconds until a retry may succeed, when the broker said (``credbroker-retry-after``).
    retry_after: int | None = field(default=None)

    def __str__(self) -> str:
        return self.message


def decision_to_json(d: pb.Decision) -> dict[str, Any]:
    return {
        "outcome": pb.Outcome.Name(d.outcome).removeprefix("OUTCOME_").lower(),
        "action_class": d.action_class,
        "rule": d.rule,
        "reasons": list(d.reasons),
        "owner": {"team": d.owner.team, "contact": d.owner.contact},
        "escalation": list(d.escalation),
        "scope_map_version": d.scope_map_version,
        "source": d.source,
        "risk": d.risk,
        "spiffe_id": d.spiffe_id,
    }


class BrokerClient:
    """The sidecar's connection to the broker: one ``grpc.aio`` channel over mTLS.

    The channel, and so every call, lives on :attr:`loop`, the sidecar's one asyncio
    loop (its own thread): the HTTP server (``sidecar.app``), the revocation watch and
    the cache-hit reporter run there too and ``await`` the calls, so no thread is held
    per request. :meth:`close` closes the channel and stops the loop.

    Raises (constructing): WorkloadApiError (no SVID); ConfigError, BundleError (the
    broker's trust domain is the sidecar's own, or its bundle file cannot be read).
    """

    def __init__(self, config: SidecarConfig) -> None:
        """Raises: WorkloadApiError (no SVID from the Workload API within 10 s)."""
        self._cfg = config
        try:
            self._x509 = X509Source(socket_path=config.workload_api_socket, timeout_in_seconds=10)
            self._jwt = JwtSource(socket_path=config.workload_api_socket, timeout_in_seconds=10) \
                if config.send_jwt_svid else None
        except Exception as exc:
            raise WorkloadApiError(
                f"no SVID from the Workload API at {config.workload_api_socket} within 10 s "
                f"({type(exc).__name__}); is the SPIRE agent (or `credbroker dev`) running?"
            ) from None
        #: The broker's trust domain's bundle when it is not ours (a vendor's sidecar):
        #: loaded and kept current as the broker keeps its federated bundles.
        self._broker_trust: FederatedBundles | None = None
        if config.broker_trust is not None:
            trust = FederatedBundles(
                [config.broker_trust],
                local_trust_domain=pem_material(self._x509).trust_domain)
            trust.load()
            threading.Thread(target=trust.run, daemon=True, name="broker-bundle").start()
            self._broker_trust = trust
        self._channel = AioRotatingChannel(
            self._x509, config.broker_addr, config.broker_dns_name,
            credentials=self._tls_credentials,
            trust_generation=None if self._broker_trust is None else self._trust_generation)
        self._stub: tuple[object, pb_grpc.CredentialBrokerStub] | None = None
        self.loop = LoopThread("sidecar")
        self._jwt_lock = asyncio.Lock()
        self._jwt_token = ""
        self._jwt_refresh_at = 0.0

    def _tls_credentials(self, material: PemMaterial) -> grpc.ChannelCredentials:
        """The mTLS credentials of a (re)built channel: our current SVID, and the broker
        verified by its trust domain's CAs (:meth:`_broker_roots`) and its DNS name
        (``broker_dns_name``).

        Raises: BrokerUnavailableError (the broker's bundle is not loaded yet).
        """
        if self._broker_trust is None:
            return channel_credentials(material)
        return grpc.ssl_channel_credentials(root_certificates=self._broker_roots(material),
                                            private_key=material.key,
                                            certificate_chain=material.chain)

    def _trust_generation(self) -> int:
        """Changes when the broker's trust domain's bundle does (the channel is rebuilt)."""
        return self._broker_trust.generation if self._broker_trust is not None else 0

    def _broker_roots(self, material: PemMaterial) -> bytes:
        """The CAs the broker's certificate must chain to now: our own bundle, or the
        broker's trust domain's from ``--broker-bundle``/``--broker-bundle-endpoint``.

        Raises: BrokerUnavailableError when that bundle is not loaded yet (its endpoint has
        not answered): never fall back to any other trust.
        """
        if self._broker_trust is None:
            return material.bundle
        pem = self._broker_trust.x509_roots_pem()
        if not pem:
            raise BrokerUnavailableError(
                "the broker's trust bundle is not loaded yet (its bundle endpoint has not "
                "answered; see the log): the broker cannot be verified")
        return pem

    def _broker(self) -> pb_grpc.CredentialBrokerStub:
        """The stub on the current channel (a new one only after a rotation)."""
        channel = self._channel.get()
        if self._stub is None or self._stub[0] is not channel:
            self._stub = (channel, pb_grpc.CredentialBrokerStub(channel))
        return self._stub[1]

    @property
    def spiffe_id(self) -> str:
        return pem_material(self._x509).spiffe_id

    async def _metadata(self) -> list[tuple[str, str]]:
        """Our JWT-SVID as a bearer token (refreshed at half its life), if configured.

        Raises: BrokerCallError (workload_api_unavailable).
        """
        if self._jwt is None:
            return []
        if time.monotonic() < self._jwt_refresh_at:  # fresh: no lock on the hot path
            return [("authorization", f"Bearer {self._jwt_token}")]
        async with self._jwt_lock:
            if time.monotonic() >= self._jwt_refresh_at:
                try:  # a blocking Workload API call, once per half-life: off the loop
                    svid = await asyncio.to_thread(self._jwt.fetch_svid,
                                                   audience={self._cfg.jwt_audience})
                except Exception as exc:  # py-spiffe raises several unrelated types
                    raise BrokerCallError(
                        503, "workload_api_unavailable",
                        f"no JWT-SVID from the Workload API at {self._cfg.workload_api_socket} "
                        f"({type(exc).__name__}); is the SPIRE agent running?") from None
                self._jwt_token = svid.token
                life = max(0.0, svid.expiry - time.time())
                self._jwt_refresh_at = time.monotonic() + life / 2
            return [("authorization", f"Bearer {self._jwt_token}")]

    async def _call(self, method: str, request: Any, timeout: float) -> Any:
        """One unary call with our JWT-SVID, on the loop. Raises: BrokerCallError."""
        try:
            stub = self._broker()
        except BrokerUnavailableError as exc:
            raise BrokerCallError(503, exc.code, str(exc)) from None
        try:
            return await getattr(stub, method)(request, metadata=await self._metadata(),
                                               timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise await self._translate(err) from None
        except asyncio.CancelledError:
            if _task_cancelled():
                raise
            # Not us: the call's channel was closed under it (retired after an SVID rotation,
            # its grace over).
            raise BrokerCallError(
                503, "broker_unavailable",
                "the call to the broker was cut off when this sidecar's connection was replaced "
                "(its SVID rotated); retry") from None

    async def issue(self, request: pb.IssueCredentialRequest) -> pb.IssueCredentialResponse:
        """Raises: BrokerCallError."""
        resp: pb.IssueCredentialResponse = await self._call("IssueCredential", request,
                                                            self._cfg.broker_timeout)
        return resp

    async def await_approval(self, approval_id: str, wait_seconds: int
                             ) -> pb.IssueCredentialResponse:
        """Raises: BrokerCallError."""
        resp: pb.IssueCredentialResponse = await self._call(
            "AwaitApproval",
            pb.AwaitApprovalRequest(approval_id=approval_id, wait_seconds=wait_seconds),
            self._cfg.broker_timeout + wait_seconds)
        return resp

    async def revoke(self, credential_id: str, reason: str) -> pb.RevokeCredentialResponse:
        """Raises: BrokerCallError."""
        resp: pb.RevokeCredentialResponse = await self._call(
            "RevokeCredential",
            pb.RevokeCredentialRequest(credential_id=credential_id, reason=reason),
            self._cfg.broker_timeout)
        return resp

    async def freeze_self(self, reason: str) -> pb.FreezeResponse:
        """Freeze this workload's own identity. Raises: BrokerCallError."""
        resp: pb.FreezeResponse = await self._call(
            "FreezeSelf", pb.FreezeSelfRequest(reason=reason), self._cfg.broker_timeout)
        return resp

    async def report_cache_hits(self, hits: list[pb.CacheHit]) -> pb.ReportCacheHitsResponse:
        """Raises: BrokerCallError."""
        resp: pb.ReportCacheHitsResponse = await self._call(
            "ReportCacheHits", pb.ReportCacheHitsRequest(hits=hits), self._cfg.broker_timeout)
        return resp

    async def _translate(self, err: grpc.aio.AioRpcError) -> BrokerCallError:
        code: grpc.StatusCode = err.code()
        details: str = err.details() or ""
        trailing = dict(err.trailing_metadata() or ())
        error_code = str(trailing.get(ERROR_CODE_MD_KEY) or FALLBACK_CODES.get(code.name,
                                                                              "internal"))
        retry = str(trailing.get(RETRY_AFTER_MD_KEY, ""))
        decision = None
        raw = trailing.get(DECISION_MD_KEY)
        if isinstance(raw, bytes):
            decision = decision_to_json(pb.Decision.FromString(raw))
        if code is grpc.StatusCode.UNAVAILABLE and ERROR_CODE_MD_KEY not in trailing:
            # A refused mTLS handshake looks like an outage to gRPC; find out which it was
            # (a blocking probe of a few seconds at most, on a failure only: off the loop).
            material = pem_material(self._x509)
            try:
                roots: bytes | None = self._broker_roots(material)
            except BrokerUnavailableError:
                roots = None
            refused = await asyncio.to_thread(
                diagnose_handshake, self._cfg.broker_addr, self._cfg.broker_dns_name,
                material, roots=roots)
            if refused is not None:
                return BrokerCallError(
                    401, "unauthenticated",
                    f"{refused}; check that this sidecar's Workload API socket "
                    f"({self._cfg.workload_api_socket}) serves an SVID of the broker's trust "
                    "domain, or of one the broker federates")
            return BrokerCallError(
                503, "broker_unavailable",
                f"the broker at {self._cfg.broker_addr} is unreachable ({_short(details)}); "
                "retry, and if it persists tell the platform on-call")
        return BrokerCallError(http_status(error_code), error_code, details, decision,
                               int(retry) if retry.isdigit() else None)

    async def watch(self, on_event: Callable[[pb.RevocationEvent], None],
                    stop: asyncio.Event) -> None:
        """Hold a WatchRevocations stream, reconnecting (after a second) until ``stop`` is
        set or the task is cancelled.

        Every (re)connection starts with a ``sync`` event, so a sidecar that lost the
        stream resynchronises instead of trusting its cache.
        """
        while not stop.is_set():
            try:
                call = self._broker().WatchRevocations(pb.WatchRevocationsRequest(),
                                             metadata=await self._metadata())
                async for event in call:
                    on_event(event)
            except grpc.aio.AioRpcError as err:
                if not stop.is_set():
                    _log.warning("revocation stream lost (%s); reconnecting", err.code())
            except asyncio.CancelledError:
                if _task_cancelled():
                    raise
                # The stream's channel was closed under it (retired after an SVID rotation).
                _log.info("revocation stream ended with its connection; reconnecting")
            except Exception:  # the stream must come back whatever happened
                _log.exception("revocation stream failed; reconnecting")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)

    async def _aclose(self) -> None:
        await self._channel.close()

    def close(self) -> None:
        """Close the channel (calls still on it are cancelled), stop the loop, and let go of
        the Workload API. Call from outside the loop; closing twice is harmless."""
        if self.loop.loop.is_running():
            try:
                self.loop.run(self._aclose(), timeout=10)
            except Exception as exc:  # closing must go on
                _log.debug("closing the channel to the broker: %s", exc)
        self.loop.close()
        if self._broker_trust is not None:
            self._broker_trust.stop()
        for src in (self._x509, self._jwt):
            if src is not None:
                try:
                    src.close()
                except Exception:  # noqa: S110 - closing must not mask anything
                    pass


def _task_cancelled() -> bool:
    """Whether the running task itself is being cancelled (a ``grpc.aio`` call cancelled
    by its channel closing raises ``CancelledError`` too)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _short(details: str) -> str:
    return " ".join(details.split())[:240]
