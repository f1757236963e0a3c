"""Signatures of wrapped tools: the tool's own parameters with their types resolved, minus
the credential, plus what the integration adds (shared by the MCP and LangChain wrappers)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

APPROVAL_PARAM = "approval_id"


def resolved_parameters(fn: Callable[..., Any], credential_param: str
                        ) -> list[inspect.Parameter]:
    """``fn``'s parameters without ``credential_param``, annotations resolved (so the wrapper
    works whatever module ``fn`` came from). Raises: TypeError (no credential parameter)."""
    sig = inspect.signature(fn)
    if credential_param not in sig.parameters:
        raise TypeError(f"{fn.__qualname__} takes no {credential_param!r} parameter: add "
                        f"`{credential_param}: Credential` (keyword) to receive the credential")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable names: keep what the signature says
        hints = {}
    return [p.replace(annotation=hints.get(n, p.annotation))
            for n, p in sig.parameters.items() if n != credential_param]


def with_extra(params: Sequence[inspect.Parameter], extra: Sequence[inspect.Parameter],
               return_annotation: Any = inspect.Signature.empty) -> inspect.Signature:
    """``params`` plus keyword-only ``extra`` (before any ``**kwargs``)."""
    head = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    tail = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in params}
    for p in extra:
        if p.name in names:
            raise TypeError(f"the tool already has a parameter named {p.name!r}, which the "
                            "credbroker wrapper adds; rename it")
    return inspect.Signature([*head, *extra, *tail], return_annotation=return_annotation)


def approval_parameter() -> inspect.Parameter:
    return inspect.Parameter(APPROVAL_PARAM, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=str | None)


def annotations_of(sig: inspect.Signature) -> dict[str, Any]:
    out = {n: p.annotation for n, p in sig.parameters.items()
           if p.annotation is not inspect.Parameter.empty}
    if sig.return_annotation is not inspect.Signature.empty:
        out["return"] = sig.return_annotation
    return out
