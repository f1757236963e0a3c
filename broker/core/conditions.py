"""`when` conditions: CEL (Common Expression Language), compiled at load, evaluated per request.

CEL is what Kubernetes (ValidatingAdmissionPolicy) and Cerbos use: side-effect
free, not Turing-complete, and always terminating. A condition sees:

* ``request``: ``action_class``, ``target``, ``justification``, ``ttl_seconds``,
  ``has_initiating_event`` and ``initiating_event`` (``source``, ``id``, ``summary``;
  empty strings when absent);
* ``identity``: ``spiffe_id``, ``trust_domain``, ``path``, ``segments`` (a list);
* ``now``: a timestamp (e.g. ``now.getHours("UTC") < 22``).

A condition that does not evaluate to a boolean, or fails to evaluate, denies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import celpy
from celpy import celtypes
from celpy.adapter import json_to_cel

from broker.core.models import CredentialRequest
from broker.core.spiffeid import SpiffeId

_ENV = celpy.Environment()


class ConditionError(ValueError):
    """A condition did not compile or did not evaluate to a boolean."""


@dataclass(frozen=True, slots=True, eq=False)
class Condition:
    text: str
    _program: Any = field(repr=False)

    @classmethod
    def compile(cls, text: str) -> Condition:
        """Raises: ConditionError with the parser's pointer to the problem."""
        try:
            ast = _ENV.compile(text)
            program = _ENV.program(ast)
        except Exception as exc:  # celpy raises its own parse error types
            detail = " ".join(str(exc).split())
            raise ConditionError(f"is not a valid CEL expression: {detail}") from None
        return cls(text=text, _program=program)

    def evaluate(self, spiffe_id: SpiffeId, request: CredentialRequest, now: datetime) -> bool:
        """Raises: ConditionError when the expression fails or is not boolean."""
        ev = request.initiating_event
        activation = {
            "request": json_to_cel({
                "action_class": request.action_class,
                "target": request.target,
                "justification": request.justification,
                "ttl_seconds": request.ttl_seconds,
                "has_initiating_event": ev is not None,
                "initiating_event": {"source": ev.source if ev else "",
                                     "id": ev.id if ev else "",
                                     "summary": ev.summary if ev else ""},
            }),
            "identity": json_to_cel({
                "spiffe_id": str(spiffe_id),
                "trust_domain": spiffe_id.trust_domain,
                "path": spiffe_id.path,
                "segments": list(spiffe_id.segments),
            }),
            "now": celtypes.TimestampType(now),
        }
        try:
            result = self._program.evaluate(activation)
        except Exception as exc:
            raise ConditionError(f"failed to evaluate: {' '.join(str(exc).split())}") from None
        if not isinstance(result, celtypes.BoolType):
            raise ConditionError(f"evaluated to {result!r}, not true or false")
        return bool(result)
