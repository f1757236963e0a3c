"""Credentials per ``tools/call`` for MCP tool servers built with the ``mcp`` Python SDK
(``MCPServer``, called FastMCP before mcp 2).
Needs ``pip install 'credbroker-client[mcp]'``.

    from mcp.server.mcpserver import MCPServer
    from credbroker_client.mcp import CredentialedTools

    server = MCPServer("enrichment")
    tools = CredentialedTools(server)   # the server's own sidecar: $CREDBROKER_SIDECAR_SOCKET

    @tools.tool("enrichment", target=lambda indicator, **_: indicator)
    async def lookup_indicator(indicator: str, *, credential: Credential) -> dict:
        ...  # credential.token: a Vault token for this one call

Every ``tools/call`` gets its own credential from the server's sidecar (see
``credbroker_client.tools`` for what the request carries), handed back when the tool
returns or raises. The initiating event comes from the request's ``_meta``
``"credbroker/incident": {"source", "id", "summary"}`` (else the server's current
``incident(...)`` scope). A class that needs approval never blocks the call: the result is
an error result whose text and ``structured_content["credbroker"]`` name the
``approval_id``; the agent calls the tool again, same arguments, with ``approval_id`` once
a person approved (each declared tool gets that optional argument). Nothing from the MCP
request — no header, no ``_meta`` field, no client token — is forwarded to the sidecar or
the tool: the tool sees its own arguments and the credential the server's identity earned.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anyio
import mcp_types
from mcp.server.mcpserver import Context, MCPServer

from credbroker_client import _core
from credbroker_client._signature import (
    APPROVAL_PARAM,
    annotations_of,
    approval_parameter,
    resolved_parameters,
    with_extra,
)
from credbroker_client.client import AsyncClient
from credbroker_client.errors import ApprovalRequired, CredbrokerError
from credbroker_client.models import InitiatingEvent, PendingApproval
from credbroker_client.tools import (
    ActionSpec,
    JustificationSpec,
    TargetSpec,
    acquire_async,
    bind_arguments,
    current_incident,
    incident,
)

#: The ``_meta`` key of a ``tools/call`` that names the incident the call is for.
INCIDENT_META_KEY = "credbroker/incident"
_CONTEXT_PARAM = "credbroker_mcp_context"
F = TypeVar("F", bound=Callable[..., Any])


def approval_result(pending: PendingApproval, tool: str) -> mcp_types.CallToolResult:
    """What a call that needs approval answers (never a hang)."""
    who = ", ".join(pending.approvers) or "an approver"
    text = (f"Not done yet: {tool} needs a person's approval ({pending.action_class}, "
            f"approval_id {pending.approval_id}, from {who}, expires "
            f"{pending.expires_at.isoformat()}). Call {tool} again with the same arguments "
            f"and approval_id=\"{pending.approval_id}\" after it is approved (retry in about "
            "30 seconds); calling without it asks for a new approval.")
    return mcp_types.CallToolResult(
        content=[mcp_types.TextContent(type="text", text=text)], is_error=True,
        structured_content={"credbroker": {
            "status": "approval_required", "approval_id": pending.approval_id,
            "action_class": pending.action_class, "approvers": list(pending.approvers),
            "expires_at": pending.expires_at.isoformat(), "retry_after_seconds": 30,
            "retry_with": {APPROVAL_PARAM: pending.approval_id}}})


def refusal_result(err: CredbrokerError, tool: str) -> mcp_types.CallToolResult:
    """What a call answers when no credential could be had (denied, frozen, outage, ...)."""
    retry = f" Retry after {err.retry_after:.0f} s." if err.retry_after else ""
    text = f"{tool} was not run: credbroker {err.code}: {err.message}.{retry}"
    info: dict[str, Any] = {"status": "refused", "code": err.code, "message": err.message}
    if err.retry_after:
        info["retry_after_seconds"] = err.retry_after
    return mcp_types.CallToolResult(content=[mcp_types.TextContent(type="text", text=text)],
                                    is_error=True, structured_content={"credbroker": info})


def incident_from_meta(meta: Mapping[str, Any] | None) -> InitiatingEvent | None:
    """The ``credbroker/incident`` of a request's ``_meta``. Raises: ValueError (malformed)."""
    raw = (meta or {}).get(INCIDENT_META_KEY)
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), str) and raw.get(k)
                                            for k in ("source", "id")):
        raise ValueError(f'_meta["{INCIDENT_META_KEY}"] must be {{"source": str, "id": str, '
                         '"summary": str (optional)}')
    summary = raw.get("summary")
    return InitiatingEvent(raw["source"], raw["id"], summary if isinstance(summary, str)
                           else None)


class CredentialedTools:
    """Declares tools on ``server`` that each get a credential per call.

    ``socket_path``: the server's sidecar (default ``$CREDBROKER_SIDECAR_SOCKET``);
    ``client_factory``: how to make the :class:`AsyncClient` each call uses (tests).
    """

    def __init__(self, server: MCPServer, *, socket_path: str | None = None,
                 client_factory: Callable[[], AsyncClient] | None = None) -> None:
        self.server = server
        self._socket = socket_path if socket_path is not None or client_factory else \
            _core.socket_from_env()
        self._factory = client_factory or (lambda: AsyncClient(self._socket))
        self._approvals = _core.ApprovalBook()

    def _client(self) -> AsyncClient:
        c = self._factory()
        c.approvals = self._approvals  # a retry with an approval id is checked across calls
        return c

    def tool(self, action_class: str, *, target: TargetSpec = None,
             justification: JustificationSpec = None, ttl_seconds: int | None = None,
             name: str | None = None, description: str | None = None,
             credential_param: str = "credential", **tool_options: Any) -> Callable[[F], F]:
        """Register the decorated function (sync or async; it takes ``credential_param``)
        as a tool of class ``action_class``; ``tool_options`` go to ``server.add_tool``."""
        def decorate(fn: F) -> F:
            self.server.add_tool(self.wrap(fn, action_class, target=target,
                                           justification=justification,
                                           ttl_seconds=ttl_seconds, name=name,
                                           credential_param=credential_param),
                                 name=name or fn.__name__,
                                 description=description or inspect.getdoc(fn),
                                 **tool_options)
            return fn

        return decorate

    def wrap(self, fn: Callable[..., Any], action_class: str, *, target: TargetSpec = None,
             justification: JustificationSpec = None, ttl_seconds: int | None = None,
             name: str | None = None, credential_param: str = "credential"
             ) -> Callable[..., Any]:
        """The async function ``server.add_tool`` registers for ``fn``."""
        tool_name = name or fn.__name__
        own = resolved_parameters(fn, credential_param)
        tool_sig = inspect.Signature(own)
        ctx_param = inspect.Parameter(_CONTEXT_PARAM, inspect.Parameter.KEYWORD_ONLY,
                                      annotation=Context, default=None)
        hints = inspect.signature(fn).return_annotation
        try:
            import typing

            hints = typing.get_type_hints(fn).get("return", hints)
        except Exception:  # noqa: S110 - keep the signature's
            pass
        outer = with_extra(own, [approval_parameter(), ctx_param], return_annotation=hints)
        spec = ActionSpec(action_class=action_class, tool=tool_name, target=target,
                          justification=justification, ttl_seconds=ttl_seconds)

        async def call(*args: Any, **kwargs: Any) -> Any:
            approval_id = kwargs.pop(APPROVAL_PARAM, None)
            ctx = kwargs.pop(_CONTEXT_PARAM, None)
            bound, named = bind_arguments(tool_sig, args, kwargs)
            try:
                meta = ctx.request_context.meta if ctx is not None else None
                event = incident_from_meta(meta) or current_incident()
            except ValueError as exc:
                return refusal_result(CredbrokerError(str(exc), code="bad_request"), tool_name)
            client = self._client()
            try:
                with _maybe_incident(event):
                    try:
                        cred = await acquire_async(client, spec, named, approval_id=approval_id,
                                                   on_approval="raise")
                    except ApprovalRequired as pending:
                        return approval_result(pending.pending, tool_name)
                    except CredbrokerError as err:
                        return refusal_result(err, tool_name)
                try:
                    result = fn(*bound.args, **bound.kwargs, **{credential_param: cred})
                    if inspect.isawaitable(result):
                        result = await result
                    return result
                finally:
                    with anyio.CancelScope(shield=True):
                        await client.hand_back_quietly(cred)
            finally:
                with anyio.CancelScope(shield=True):
                    await client.aclose()

        call.__name__ = tool_name
        call.__qualname__ = getattr(fn, "__qualname__", tool_name)
        call.__doc__ = fn.__doc__
        call.__signature__ = outer  # type: ignore[attr-defined]
        call.__annotations__ = annotations_of(outer)
        call.action_spec = spec  # type: ignore[attr-defined]
        return call


class _NoIncident:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _maybe_incident(event: InitiatingEvent | None) -> Any:
    if event is None:
        return _NoIncident()
    return incident(event.source, event.id, event.summary)
