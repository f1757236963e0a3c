"""A credential per tool call: ``@requires_action`` and the ``incident(...)`` scope.

    from credbroker_client import incident, requires_action

    @requires_action("containment.isolate_host", target=lambda host, **_: host,
                     justification="C2 beaconing confirmed", on_approval="wait")
    def isolate_host(host: str, *, credential: Credential) -> str:
        ...  # credential.token: a Vault token for this one call

    with incident("splunk", "NOTABLE-4242", "beaconing from ws-042"):
        isolate_host("ws-042")

Each call asks the sidecar for its own credential: the action class, the target (computed
from the call's arguments), the current incident as the initiating event, and a
justification that ends with ``[tool NAME args sha256:HEX]`` — a SHA-256 over the tool's
name and its arguments in canonical JSON — so the broker's decision record (and
``credbroker audit trace``) binds the credential to what the tool was asked to do. The
credential is handed back when the tool returns or raises.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import inspect
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

from credbroker_client import _core
from credbroker_client._codes import ApprovalRefusedError
from credbroker_client.client import AsyncClient, Client
from credbroker_client.errors import ApprovalRequired
from credbroker_client.models import Credential, InitiatingEvent, PendingApproval

#: The justification field's limit (characters) at the sidecar.
JUSTIFICATION_MAX = 2048

_incident: contextvars.ContextVar[InitiatingEvent | None] = contextvars.ContextVar(
    "credbroker_incident", default=None)
_approval: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "credbroker_approval_id", default=None)

OnApproval = Literal["raise", "wait"]
F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def incident(source: str, id: str, summary: str | None = None) -> Iterator[InitiatingEvent]:
    """The alert the agent is working on: every credential asked for inside names it as its
    initiating event (tasks and threads started inside inherit it, as contextvars do)."""
    token = _incident.set(InitiatingEvent(source, id, summary))
    try:
        yield _incident.get()  # type: ignore[misc]
    finally:
        _incident.reset(token)


def current_incident() -> InitiatingEvent | None:
    return _incident.get()


@contextmanager
def using_approval(approval_id: str) -> Iterator[None]:
    """Retry a tool call with the approval an earlier :class:`ApprovalRequired` named:
    ``with using_approval(e.approval_id): isolate_host("ws-042")``. The credential is released
    only for the very same call (class, target, incident, arguments)."""
    token = _approval.set(approval_id)
    try:
        yield
    finally:
        _approval.reset(token)


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes_sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, set | frozenset):
        return sorted(value, key=repr)
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        return dump(mode="json")
    return repr(value)


def arguments_digest(tool: str, arguments: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of ``{"tool": tool, "arguments": arguments}`` as canonical JSON (sorted
    keys, no spaces, UTF-8); values JSON cannot hold are taken by ``repr``."""
    text = json.dumps({"tool": tool, "arguments": dict(arguments)}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=_jsonable)
    return hashlib.sha256(text.encode()).hexdigest()


def bound_justification(reason: str | None, tool: str, digest: str) -> str:
    """``"<reason> [tool <tool> args sha256:<digest>]"``, the reason shortened to fit."""
    suffix = f"[tool {tool} args sha256:{digest}]"
    reason = (reason or "").strip()
    room = JUSTIFICATION_MAX - len(suffix) - 1
    if len(reason) > room:
        reason = reason[:max(0, room - 1)] + "…"
    return f"{reason} {suffix}" if reason else suffix


TargetSpec = str | Callable[..., str | None] | None
JustificationSpec = str | Callable[..., str] | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ActionSpec:
    """How a tool asks for its credential (see :func:`requires_action`)."""

    action_class: str
    tool: str
    target: TargetSpec = None
    justification: JustificationSpec = None
    ttl_seconds: int | None = None

    def fields(self, arguments: Mapping[str, Any]) -> dict[str, Any]:
        """The request's fields for one call with these (bound) ``arguments``."""
        target = self.target(**arguments) if callable(self.target) else self.target
        reason = (self.justification(**arguments) if callable(self.justification)
                  else self.justification)
        return {"target": target, "initiating_event": current_incident(),
                "justification": bound_justification(reason, self.tool,
                                                     arguments_digest(self.tool, arguments)),
                "ttl_seconds": self.ttl_seconds}


def _refused_for_other_call(approval_id: str) -> ApprovalRefusedError:
    return ApprovalRefusedError(
        f"approval {approval_id} was asked for another call (other arguments, target or "
        "incident); call without it to ask for approval of this one", code="approval_refused")


OnPending = Callable[[PendingApproval], Any]


def acquire(client: Client, spec: ActionSpec, arguments: Mapping[str, Any], *,
            approval_id: str | None = None, on_approval: OnApproval = "raise",
            approval_timeout: float = 300.0, on_pending: OnPending | None = None) -> Credential:
    """One call's credential. ``on_pending`` is told of a pending approval before it is
    waited for. Raises: :class:`ApprovalRequired` (``on_approval="raise"``),
    :class:`ApprovalTimeout`, the error code's exception."""
    fields = spec.fields(arguments)
    result: Credential | PendingApproval
    if approval_id:
        fp = _core.request_fingerprint(_core.issue_body(spec.action_class, **fields))
        if client.approvals.matches(approval_id, fp):
            result = client.poll_approval(approval_id)
        elif client.approvals.knows(approval_id):
            raise _refused_for_other_call(approval_id)
        else:  # not opened by this client: the broker checks it is for this exact request
            result = client.request(spec.action_class, approval_id=approval_id, **fields)
    else:
        result = client.request(spec.action_class, **fields)
    if isinstance(result, Credential):
        return result
    if on_approval == "wait":
        if on_pending is not None:
            on_pending(result)
        return client.wait_for_approval(result.approval_id, approval_timeout)
    raise ApprovalRequired(result)


async def acquire_async(client: AsyncClient, spec: ActionSpec, arguments: Mapping[str, Any], *,
                        approval_id: str | None = None, on_approval: OnApproval = "raise",
                        approval_timeout: float = 300.0,
                        on_pending: OnPending | None = None) -> Credential:
    """See :func:`acquire`."""
    fields = spec.fields(arguments)
    result: Credential | PendingApproval
    if approval_id:
        fp = _core.request_fingerprint(_core.issue_body(spec.action_class, **fields))
        if client.approvals.matches(approval_id, fp):
            result = await client.poll_approval(approval_id)
        elif client.approvals.knows(approval_id):
            raise _refused_for_other_call(approval_id)
        else:
            result = await client.request(spec.action_class, approval_id=approval_id, **fields)
    else:
        result = await client.request(spec.action_class, **fields)
    if isinstance(result, Credential):
        return result
    if on_approval == "wait":
        if on_pending is not None:
            told = on_pending(result)
            if inspect.isawaitable(told):
                await told
        return await client.wait_for_approval(result.approval_id, approval_timeout)
    raise ApprovalRequired(result)


def tool_signature(fn: Callable[..., Any], credential_param: str) -> inspect.Signature:
    """``fn``'s signature without its credential parameter (what callers and frameworks see)."""
    sig = inspect.signature(fn)
    if credential_param not in sig.parameters:
        raise TypeError(f"{fn.__qualname__} takes no {credential_param!r} parameter: add "
                        f"`{credential_param}: Credential` (keyword) to receive the credential")
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != credential_param])


def bind_arguments(sig: inspect.Signature, args: tuple[Any, ...],
                   kwargs: Mapping[str, Any]) -> tuple[inspect.BoundArguments, dict[str, Any]]:
    """The call bound to ``sig`` (defaults applied), and its arguments by name (``**kwargs``
    flattened in)."""
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return bound, named


def requires_action(action_class: str, *, target: TargetSpec = None,
                    justification: JustificationSpec = None, ttl_seconds: int | None = None,
                    on_approval: OnApproval = "raise", approval_timeout: float = 300.0,
                    client: Client | AsyncClient | None = None, name: str | None = None,
                    credential_param: str = "credential",
                    on_pending: OnPending | None = None) -> Callable[[F], F]:
    """Give each call of the decorated function (sync or async) its own credential.

    ``target``/``justification``: a string, or a function of the tool's arguments (called
    with them by name, e.g. ``lambda host, **_: host``). ``on_approval``: ``"raise"``
    :class:`ApprovalRequired` (retry later inside :func:`using_approval`) or ``"wait"`` up
    to ``approval_timeout`` seconds, first telling ``on_pending`` (e.g. to page a person
    with the approval id; it may be async for async functions). ``client``: a
    :class:`Client` for sync functions, an :class:`AsyncClient` for async ones; by default
    one from ``$CREDBROKER_SIDECAR_SOCKET``.
    The credential is passed as the keyword ``credential_param`` and handed back when the
    function returns or raises.
    """
    def decorate(fn: F) -> F:
        sig = tool_signature(fn, credential_param)
        spec = ActionSpec(action_class=action_class, tool=name or fn.__name__, target=target,
                          justification=justification, ttl_seconds=ttl_seconds)

        if inspect.iscoroutinefunction(fn):
            book = _core.ApprovalBook()  # shared by the per-call clients made below

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                bound, named = bind_arguments(sig, args, kwargs)
                own = client is None
                if client is not None:
                    c = cast(AsyncClient, client)
                else:  # one per call: an AsyncClient belongs to one event loop
                    c = AsyncClient()
                    c.approvals = book
                try:
                    cred = await acquire_async(c, spec, named, approval_id=_approval.get(),
                                               on_approval=on_approval,
                                               approval_timeout=approval_timeout,
                                               on_pending=on_pending)
                    try:
                        return await fn(*bound.args, **bound.kwargs, **{credential_param: cred})
                    finally:
                        await _hand_back_shielded(c, cred)
                finally:
                    if own:
                        await c.aclose()

            wrapper: Any = run_async
        else:
            lazy: list[Client] = []

            @functools.wraps(fn)
            def run_sync(*args: Any, **kwargs: Any) -> Any:
                bound, named = bind_arguments(sig, args, kwargs)
                if client is not None:
                    c = cast(Client, client)
                else:
                    if not lazy:
                        lazy.append(Client())
                    c = lazy[0]
                cred = acquire(c, spec, named, approval_id=_approval.get(),
                               on_approval=on_approval, approval_timeout=approval_timeout,
                               on_pending=on_pending)
                try:
                    return fn(*bound.args, **bound.kwargs, **{credential_param: cred})
                finally:
                    c.hand_back_quietly(cred)

            wrapper = run_sync
        wrapper.__signature__ = sig
        wrapper.__annotations__ = {k: v for k, v in getattr(fn, "__annotations__", {}).items()
                                   if k != credential_param}
        wrapper.action_spec = spec
        return cast(F, wrapper)

    return decorate


async def _hand_back_shielded(client: AsyncClient, cred: Credential) -> None:
    import anyio

    with anyio.CancelScope(shield=True):
        await client.hand_back_quietly(cred)
