"""`when` conditions: CEL (Common Expression Language), compiled at load, evaluated per request.

CEL is what Kubernetes (ValidatingAdmissionPolicy) and Cerbos use: side-effect
free, not Turing-complete, and always terminating. A condition sees:

* ``request``: ``action_class``, ``target``, ``justification``, ``ttl_seconds``,
  ``has_initiating_event`` and ``initiating_event`` (``source``, ``id``, ``summary``;
  empty strings when absent);
* ``identity``: ``spiffe_id``, ``trust_domain``, ``path``, ``segments`` (a list);
* ``now``: a timestamp (e.g. ``now.getHours("UTC") < 22``).

A condition is type-checked when the map loads (see :mod:`broker.core.celcheck`), so
an unknown field or a non-boolean result is a lint error, not a denial of every
request. One that still fails to evaluate on some request (an index out of range)
denies.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import celpy
import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.celparser import CELParseError

from broker.core.celcheck import sample_problems, syntax_problem, type_problems
from broker.core.models import CredentialRequest
from broker.core.spiffeid import SpiffeId

_ENV = celpy.Environment()


class ConditionError(ValueError):
    """A condition did not compile or did not evaluate to a boolean.

    ``problems`` holds each thing wrong (at compile time there may be several);
    ``str()`` joins them.
    """

    def __init__(self, *problems: str) -> None:
        super().__init__("; ".join(problems))
        self.problems: tuple[str, ...] = problems


@dataclass(frozen=True, slots=True, eq=False)
class Condition:
    text: str
    _program: Any = field(repr=False)

    @property
    def uses_time(self) -> bool:
        """The condition reads ``now`` (so its answer changes with the time)."""
        return re.search(r"\bnow\b", self.text) is not None

    @classmethod
    def compile(cls, text: str) -> Condition:
        """Parse and type-check ``text`` against the fields a condition can see.

        Raises:
            ConditionError: a syntax error (shown with a caret under the position),
                or the problems :func:`~broker.core.celcheck.type_problems` and
                :func:`~broker.core.celcheck.sample_problems` find: an unknown
                field, variable or function, operands of the wrong type, or a
                result that is not true or false.
        """
        try:
            ast = _ENV.compile(text)
        except CELParseError as exc:
            line, column = exc.line, exc.column
            lx = exc.__context__
            if isinstance(lx, lark.exceptions.UnexpectedToken) and lx.token.type == "$END":
                lines = text.rstrip().splitlines() or [""]  # point past the last character
                line, column = len(lines), len(lines[-1]) + 1
            raise ConditionError(syntax_problem(text, line, column, _parse_detail(exc))
                                 ) from None
        problems = type_problems(text, ast)
        if problems:
            raise ConditionError(*problems)
        try:
            program = _ENV.program(ast)
        except Exception as exc:  # celpy raises its own types while binding
            raise ConditionError(f"is not a valid CEL expression: {' '.join(str(exc).split())}"
                                 ) from None
        problems = sample_problems(program)
        if problems:
            raise ConditionError(*problems)
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


def _parse_detail(exc: CELParseError) -> str:
    """What the parser did not expect, in words (celpy keeps lark's error as the context)."""
    lx = exc.__context__
    if isinstance(lx, lark.exceptions.UnexpectedToken):
        if lx.token.type == "$END":
            return "the expression ends too early"
        return f"unexpected {str(lx.token)!r}"
    if isinstance(lx, lark.exceptions.UnexpectedCharacters):
        return f"unexpected character {lx.char!r}"
    return "syntax error"
