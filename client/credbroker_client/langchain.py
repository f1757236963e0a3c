"""LangChain tools with an action class: each invocation gets its own credential. Needs
``pip install 'credbroker-client[langchain]'`` (langchain-core).

    from credbroker_client.langchain import credentialed_tool

    def isolate_host(host: str, *, credential: Credential) -> str:
        \"\"\"Network-isolate one host through the EDR.\"\"\"
        ...

    tool = credentialed_tool(isolate_host, "containment.isolate_host",
                             target=lambda host, **_: host)
    tool.invoke({"host": "ws-042"})

The tool's schema is the function's parameters (without the credential) plus an optional
``approval_id``. When the class needs approval the tool does not run: by default
(``on_approval="raise"``) the agent gets a message naming the approval id, to call again
with it once approved; ``on_approval="wait"`` waits up to ``approval_timeout`` seconds.
Refusals (denied, frozen, budget spent, ...) reach the agent as the tool's error text.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from langchain_core.tools import StructuredTool, ToolException
from pydantic import create_model

from credbroker_client._signature import APPROVAL_PARAM, resolved_parameters
from credbroker_client.client import AsyncClient, Client
from credbroker_client.errors import ApprovalRequired, CredbrokerError
from credbroker_client.tools import (
    ActionSpec,
    JustificationSpec,
    OnApproval,
    TargetSpec,
    acquire,
    acquire_async,
    bind_arguments,
)


def _tell(err: CredbrokerError, tool: str) -> ToolException:
    if isinstance(err, ApprovalRequired):
        p = err.pending
        return ToolException(
            f"Not done yet: {tool} needs a person's approval ({p.action_class}, approval_id "
            f"{p.approval_id}, from {', '.join(p.approvers) or 'an approver'}). Call {tool} "
            f"again with the same arguments and {APPROVAL_PARAM}=\"{p.approval_id}\" after it "
            "is approved.")
    retry = f" Retry after {err.retry_after:.0f} s." if err.retry_after else ""
    return ToolException(f"{tool} was not run: credbroker {err.code}: {err.message}.{retry}")


def credentialed_tool(fn: Callable[..., Any], action_class: str, *, target: TargetSpec = None,
                      justification: JustificationSpec = None, ttl_seconds: int | None = None,
                      name: str | None = None, description: str | None = None,
                      on_approval: OnApproval = "raise", approval_timeout: float = 300.0,
                      client: Client | None = None,
                      async_client_factory: Callable[[], AsyncClient] | None = None,
                      credential_param: str = "credential") -> StructuredTool:
    """``fn`` (sync or async, taking ``credential_param``) as a LangChain tool whose every
    invocation gets a credential of ``action_class``, handed back when ``fn`` returns or
    raises. ``client``: for sync functions (default: from ``$CREDBROKER_SIDECAR_SOCKET``);
    async functions make one :class:`AsyncClient` per call (``async_client_factory``)."""
    tool_name = name or fn.__name__
    params = resolved_parameters(fn, credential_param)
    if any(p.name == APPROVAL_PARAM for p in params):
        raise TypeError(f"{tool_name} already has a parameter named {APPROVAL_PARAM!r}")
    tool_sig = inspect.Signature(params)
    fields: dict[str, Any] = {
        p.name: (Any if p.annotation is inspect.Parameter.empty else p.annotation,
                 ... if p.default is inspect.Parameter.empty else p.default)
        for p in params if p.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                          inspect.Parameter.VAR_KEYWORD)}
    fields[APPROVAL_PARAM] = (str | None, None)
    schema = create_model(f"{tool_name}_arguments", **fields)
    spec = ActionSpec(action_class=action_class, tool=tool_name, target=target,
                      justification=justification, ttl_seconds=ttl_seconds)
    shared: list[Client] = [client] if client is not None else []
    book_holder: list[Any] = []

    def run(**kwargs: Any) -> Any:
        approval_id = kwargs.pop(APPROVAL_PARAM, None)
        bound, named = bind_arguments(tool_sig, (), kwargs)
        if not shared:
            shared.append(Client())
        c = shared[0]
        try:
            cred = acquire(c, spec, named, approval_id=approval_id, on_approval=on_approval,
                           approval_timeout=approval_timeout)
        except CredbrokerError as err:
            raise _tell(err, tool_name) from None
        try:
            return fn(*bound.args, **bound.kwargs, **{credential_param: cred})
        finally:
            c.hand_back_quietly(cred)

    async def arun(**kwargs: Any) -> Any:
        approval_id = kwargs.pop(APPROVAL_PARAM, None)
        bound, named = bind_arguments(tool_sig, (), kwargs)
        c = async_client_factory() if async_client_factory else AsyncClient()
        if not book_holder:
            book_holder.append(c.approvals)
        c.approvals = book_holder[0]
        try:
            try:
                cred = await acquire_async(c, spec, named, approval_id=approval_id,
                                           on_approval=on_approval,
                                           approval_timeout=approval_timeout)
            except CredbrokerError as err:
                raise _tell(err, tool_name) from None
            try:
                return await fn(*bound.args, **bound.kwargs, **{credential_param: cred})
            finally:
                await c.hand_back_quietly(cred)
        finally:
            await c.aclose()

    is_async = inspect.iscoroutinefunction(fn)
    tool = StructuredTool.from_function(
        func=None if is_async else run, coroutine=arun if is_async else None,
        name=tool_name, description=description or inspect.getdoc(fn) or tool_name,
        args_schema=schema, infer_schema=False, handle_tool_error=True)
    tool.metadata = {**(tool.metadata or {}), "credbroker_action_class": action_class}
    return tool
