"""Type checks for ``when`` conditions, run when a map is loaded (and so by ``scope lint``).

cel-python has no type checker, so a condition like ``request.initiating_event.sorce ==
"splunk"`` or ``request.ttl_seconds`` used to load and then deny every request at
run time. This module closes that gap in two steps, both pure:

1. :func:`type_problems` walks the parsed expression (celpy's lark tree) and infers
   a type for every node against the fields a condition can see
   (:data:`FIELDS`, :data:`VARIABLES`): an unknown field or variable, an unknown
   function, an operator or function applied to the wrong types, and a result
   that is not a boolean are each reported. Where a type cannot be known (a map
   key, ``type()``), the node is ``dyn`` and nothing is claimed about it.
2. :func:`sample_problems` evaluates the expression against typed sample
   requests (every field present; no initiating event) as a backstop: a type
   error (no such overload) or a non-boolean result is a problem, while errors
   that depend on a real request's values (an index out of range, a missing map
   key, ``int("ws-1")``) are not; those still deny at run time.

:func:`syntax_problem` renders a parse error whole, with a caret under the position.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import lark
from celpy import celtypes
from celpy.adapter import json_to_cel
from celpy.evaluation import CELEvalError

DYN = "dyn"
BOOL, INT, UINT, DOUBLE, STRING, BYTES = "bool", "int", "uint", "double", "string", "bytes"
NULL, TIMESTAMP, DURATION, MAP = "null", "timestamp", "duration", "map"

#: The objects a condition can see, by name, and their fields' types.
FIELDS: Mapping[str, Mapping[str, str]] = {
    "request": {
        "action_class": STRING, "target": STRING, "justification": STRING,
        "ttl_seconds": INT, "has_initiating_event": BOOL,
        "initiating_event": "request.initiating_event",
    },
    "request.initiating_event": {"source": STRING, "id": STRING, "summary": STRING},
    "identity": {"spiffe_id": STRING, "trust_domain": STRING, "path": STRING,
                 "segments": "list(string)"},
}
#: The variables a condition can see.
VARIABLES: Mapping[str, str] = {"request": "request", "identity": "identity", "now": TIMESTAMP}

_ORDERED = {INT, UINT, DOUBLE, STRING, BYTES, TIMESTAMP, DURATION, BOOL}
_NUMERIC = {INT, UINT, DOUBLE}
_TIME_PARTS = ("getFullYear", "getMonth", "getDayOfYear", "getDayOfMonth", "getDate",
               "getDayOfWeek", "getHours", "getMinutes", "getSeconds", "getMilliseconds")
_DURATION_PARTS = ("getHours", "getMinutes", "getSeconds", "getMilliseconds")
_STRING_TESTS = ("startsWith", "endsWith", "contains", "matches")
_CONVERSIONS = {"int": INT, "uint": UINT, "double": DOUBLE, "string": STRING, "bytes": BYTES,
                "bool": BOOL, "timestamp": TIMESTAMP, "duration": DURATION}
_MACROS = ("all", "exists", "exists_one", "map", "filter")
#: Every function a condition may call (the celpy runtime's, plus the macros).
FUNCTIONS = tuple(sorted({*_TIME_PARTS, *_STRING_TESTS, *_CONVERSIONS, *_MACROS,
                          "size", "type", "has"}))
_LITERALS = {"INT_LIT": INT, "UINT_LIT": UINT, "FLOAT_LIT": DOUBLE, "STRING_LIT": STRING,
             "MLSTRING_LIT": STRING, "BYTES_LIT": BYTES, "BOOL_LIT": BOOL, "NULL_LIT": NULL}
_OPS = {"relation_lt": "<", "relation_le": "<=", "relation_gt": ">", "relation_ge": ">=",
        "relation_eq": "==", "relation_ne": "!=", "relation_in": "in",
        "addition_add": "+", "addition_sub": "-", "multiplication_mul": "*",
        "multiplication_div": "/", "multiplication_mod": "%"}


def _list_of(t: str) -> str:
    return f"list({t})"


def _element(t: str) -> str | None:
    """The element type of a list type, or None when ``t`` is not a list."""
    return t[5:-1] if t.startswith("list(") else None


def describe(t: str) -> str:
    """A type as a reader says it: ``an int``, ``a list of strings``, ``true or false``."""
    if t in FIELDS:
        return f"an object (fields {', '.join(FIELDS[t])})"
    elem = _element(t)
    if elem is not None:
        return "a list" if elem == DYN else f"a list of {elem}s"
    return {BOOL: "true or false", INT: "an int", UINT: "a uint", DOUBLE: "a double",
            NULL: "null", MAP: "a map", DYN: "a value"}.get(t, f"a {t}")


def _same(a: str, b: str) -> bool:
    """Whether two values of these types may meet in ``==``, ``<`` or an arithmetic operator."""
    if DYN in (a, b) or a == b:
        return True
    ea, eb = _element(a), _element(b)
    return ea is not None and eb is not None and DYN in (ea, eb)


def _arith(op: str, a: str, b: str) -> str | None:
    """The result type of ``a op b``; None when CEL defines no such operator."""
    if DYN in (a, b):
        return DYN
    if op == "+":
        if a == b and (a in (*_NUMERIC, STRING, BYTES, DURATION) or _element(a) is not None):
            return a
        if {a, b} == {TIMESTAMP, DURATION}:
            return TIMESTAMP
        if _element(a) is not None and _element(b) is not None:
            return _list_of(DYN)
        return None
    if op == "-":
        if a == b and a in (*_NUMERIC, DURATION):
            return a
        if a == TIMESTAMP and b in (TIMESTAMP, DURATION):
            return DURATION if b == TIMESTAMP else TIMESTAMP
        return None
    if op == "%":
        return a if a == b and a in (INT, UINT) else None
    return a if a == b and a in _NUMERIC else None


def _example(text: str, t: str) -> str:
    """A boolean the author might have meant, for an expression of type ``t``."""
    if t in _NUMERIC:
        return f"{text} <= 300"
    if t == STRING:
        return f'{text} == "..."'
    if t == TIMESTAMP:
        return f'{text}.getHours("UTC") < 22'
    if _element(t) is not None:
        return f'"agent" in {text}'
    return f"{text} == ..."


class _Checker:
    def __init__(self, text: str) -> None:
        self.text = text
        self.problems: list[str] = []
        self.scopes: list[dict[str, str]] = []

    def src(self, node: lark.Tree[lark.Token] | lark.Token) -> str:
        if isinstance(node, lark.Token):
            return str(node)
        meta = node.meta
        if getattr(meta, "empty", True):
            return "(expression)"
        return " ".join(self.text[meta.start_pos:meta.end_pos].split())

    def problem(self, what: str) -> str:
        self.problems.append(what)
        return DYN

    def need(self, node: lark.Tree[lark.Token], t: str, want: str, why: str) -> None:
        if t not in (want, DYN):
            self.problem(f"{self.src(node)} is {describe(t)}; {why}")

    # -- the walk ------------------------------------------------------------

    def type_of(self, node: lark.Tree[lark.Token] | lark.Token) -> str:
        if isinstance(node, lark.Token):
            return _LITERALS.get(node.type, DYN)
        kids = [k for k in node.children if isinstance(k, lark.Tree | lark.Token)]
        handler: Callable[[lark.Tree[lark.Token], list[Any]], str] | None = getattr(
            self, f"t_{node.data}", None)
        if handler is not None:
            return handler(node, kids)
        if len(kids) == 1:  # member, primary, and the one-child forms of the operators
            return self.type_of(kids[0])
        return DYN  # a construct this checker does not model: claim nothing

    def t_expr(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        if len(kids) == 1:
            return self.type_of(kids[0])
        cond, yes, no = kids
        self.need(cond, self.type_of(cond), BOOL, "the condition of `? :` must be true or false")
        a, b = self.type_of(yes), self.type_of(no)
        if _same(a, b):
            return a if a != DYN else b
        return self.problem(f"the two branches of `{self.src(node)}` are {describe(a)} and "
                            f"{describe(b)}; both must be of one type")

    def _logical(self, op: str, kids: list[Any]) -> str:
        if len(kids) == 1:
            return self.type_of(kids[0])
        for k in kids:
            self.need(k, self.type_of(k), BOOL, f"both sides of {op} must be true or false")
        return BOOL

    def t_conditionalor(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        return self._logical("||", kids)

    def t_conditionaland(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        return self._logical("&&", kids)

    def _binary(self, kids: list[Any]) -> tuple[str, Any, str, Any, str]:
        opnode, right = kids
        left = opnode.children[0]
        return _OPS[opnode.data], left, self.type_of(left), right, self.type_of(right)

    def t_relation(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        if len(kids) == 1:
            return self.type_of(kids[0])
        op, left, a, right, b = self._binary(kids)
        ls, rs = self.src(left), self.src(right)
        if op == "in":
            elem = _element(b)
            if b == STRING:
                return self.problem(f"{rs} is a string; `in` needs a list or a map (for a "
                                    f"substring write {rs}.contains({ls}))")
            if b not in (DYN, MAP) and elem is None:
                return self.problem(f"{rs} is {describe(b)}; `in` needs a list or a map")
            if elem is not None and not _same(a, elem):
                return self.problem(f"{ls} is {describe(a)} but {rs} is {describe(b)}; "
                                    f"`in` never finds {describe(a)} there")
            return BOOL
        if not _same(a, b) and not (op in ("==", "!=") and NULL in (a, b)
                                    and ({a, b} - {NULL}) <= {MAP, *FIELDS}):
            hint = ""
            quoted = rs if b == STRING else ls
            if {a, b} == {INT, STRING} and quoted.strip("\"'").isdigit():
                hint = f" (write a number without quotes: {quoted.strip(chr(34) + chr(39))}, " \
                    f"not {quoted})"
            elif {a, b} <= _NUMERIC:
                hint = " (CEL does not mix number types: write 1 for an int, 1.0 for a double)"
            return self.problem(f"`{ls} {op} {rs}` compares {describe(a)} with {describe(b)}; "
                                f"{op} needs two values of the same type{hint}")
        if op not in ("==", "!=") and a != DYN and a not in _ORDERED:
            return self.problem(f"`{ls} {op} {rs}`: {describe(a)} cannot be ordered")
        return BOOL

    def _arithmetic(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        if len(kids) == 1:
            return self.type_of(kids[0])
        op, left, a, right, b = self._binary(kids)
        out = _arith(op, a, b)
        if out is None:
            return self.problem(f"`{self.src(left)} {op} {self.src(right)}` applies {op} to "
                                f"{describe(a)} and {describe(b)}; CEL defines no such operator")
        return out

    def t_addition(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        return self._arithmetic(node, kids)

    def t_multiplication(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        return self._arithmetic(node, kids)

    def t_unary(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        if len(kids) == 1:
            return self.type_of(kids[0])
        op, operand = kids
        t = self.type_of(operand)
        if op.data == "unary_not":
            self.need(operand, t, BOOL, "`!` needs true or false")
            return BOOL
        if t not in (DYN, INT, DOUBLE, DURATION):
            return self.problem(f"{self.src(operand)} is {describe(t)}; `-` needs a number")
        return t

    def t_member_dot(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        base, name = kids[0], str(kids[1])
        t = self.type_of(base)
        if t in (DYN, MAP):
            return DYN
        if t not in FIELDS:
            return self.problem(f"{self.src(base)} is {describe(t)}; it has no field {name}")
        fields = FIELDS[t]
        if name in fields:
            return fields[name]
        close = difflib.get_close_matches(name, list(fields), n=1)
        maybe = f" (did you mean {t}.{close[0]}?)" if close else ""
        return self.problem(f"{self.src(base)}.{name} is not a field{maybe}; the fields that "
                            f"exist are {', '.join(f'{t}.{f}' for f in fields)}")

    def _args(self, kids: list[Any], at: int) -> list[Any]:
        if len(kids) > at and isinstance(kids[at], lark.Tree) and kids[at].data == "exprlist":
            return list(kids[at].children)
        return []

    def _ident(self, node: Any) -> str | None:
        """The name when ``node`` is nothing but an identifier."""
        while isinstance(node, lark.Tree) and len(node.children) == 1:
            if node.data == "ident":
                return str(node.children[0])
            node = node.children[0]
        return None

    def t_member_dot_arg(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        base, name, args = kids[0], str(kids[1]), self._args(kids, 2)
        t = self.type_of(base)
        call = f"{self.src(base)}.{name}()"
        if name in _MACROS:
            var = self._ident(args[0]) if args else None
            if var is None or len(args) not in (2, 3) or (len(args) == 3 and name != "map"):
                return self.problem(f"{call} takes a variable name and an expression, e.g. "
                                    f'{self.src(base)}.{name}(s, s == "agent")')
            elem = _element(t)
            if elem is None and t not in (DYN, MAP):
                return self.problem(f"{self.src(base)} is {describe(t)}; {name}() needs a list")
            self.scopes.append({var: elem or DYN})
            try:
                types = [self.type_of(a) for a in args[1:]]
            finally:
                self.scopes.pop()
            if name in ("all", "exists", "exists_one", "filter") or len(args) == 3:
                self.need(args[1], types[0], BOOL, f"the test in {name}() must be true or false")
            if name == "filter":
                return t
            return _list_of(types[-1]) if name == "map" else BOOL
        types = [self.type_of(a) for a in args]
        return self._call(name, call, t, args, types)

    def t_ident_arg(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        name, args = str(kids[0]), self._args(kids, 1)
        if name == "has":
            inner = args[0] if len(args) == 1 else None
            while isinstance(inner, lark.Tree) and len(inner.children) == 1 \
                    and inner.data != "member_dot":
                inner = inner.children[0]
            if not isinstance(inner, lark.Tree) or inner.data != "member_dot":
                return self.problem("has() takes one field, e.g. has(request.target)")
            self.type_of(inner)
            return BOOL
        if name in _CONVERSIONS or name == "type":
            for a in args:
                self.type_of(a)
            if len(args) != 1:
                return self.problem(f"{name}() takes one argument")
            return _CONVERSIONS.get(name, DYN)
        if name == "size" or name in _STRING_TESTS or name in _TIME_PARTS:
            if not args:
                return self.problem(f"{name}() needs arguments")
            types = [self.type_of(a) for a in args]
            return self._call(name, f"{name}()", types[0], args[1:], types[1:])
        for a in args:
            self.type_of(a)
        return self._unknown(name)

    def _unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, FUNCTIONS, n=1)
        maybe = f" (did you mean {close[0]}?)" if close else ""
        return self.problem(f"{name}() is not a function conditions can call{maybe}; the "
                            f"functions that exist are {', '.join(FUNCTIONS)}")

    def _call(self, name: str, call: str, t: str, args: Sequence[Any],
              types: Sequence[str]) -> str:
        """A receiver-style call ``x.name(args)`` where ``x`` has type ``t``."""
        if name == "size":
            if t not in (DYN, STRING, BYTES, MAP) and _element(t) is None:
                return self.problem(f"{call}: {describe(t)} has no size")
            return INT
        if name in _STRING_TESTS:
            if t not in (DYN, STRING):
                return self.problem(f"{call}: {name}() is for strings, and this is "
                                    f"{describe(t)}")
            if len(args) != 1:
                return self.problem(f"{call} takes one string")
            self.need(args[0], types[0], STRING, f"{name}() takes a string")
            return BOOL
        if name in _TIME_PARTS:
            if t == DURATION and name in _DURATION_PARTS and not args:
                return INT
            if t not in (DYN, TIMESTAMP):
                return self.problem(f"{call}: {name}() is for timestamps (now), and this is "
                                    f"{describe(t)}")
            if len(args) > 1:
                return self.problem(f'{call} takes at most a time zone, e.g. {name}("UTC")')
            for a, at in zip(args, types, strict=True):
                self.need(a, at, STRING, f'{name}() takes a time zone name, e.g. "UTC"')
            return INT
        return self._unknown(name)

    def t_member_index(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        base, index = kids
        t, i = self.type_of(base), self.type_of(index)
        if t in (DYN, MAP):
            return DYN
        elem = _element(t)
        if elem is None:
            return self.problem(f"{self.src(base)} is {describe(t)}; only lists and maps "
                                "can be indexed with [...]")
        self.need(index, i, INT, "a list index must be an int")
        return elem

    def t_ident(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        name = str(kids[0])
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        if name in VARIABLES:
            return VARIABLES[name]
        close = difflib.get_close_matches(name, list(VARIABLES), n=1)
        maybe = f" (did you mean {close[0]}?)" if close else ""
        return self.problem(f"{name} is not a variable{maybe}; the variables that exist are "
                            f"{', '.join(VARIABLES)}")

    def t_list_lit(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        types = {self.type_of(a) for a in self._args(kids, 0)}
        return _list_of(types.pop() if len(types) == 1 else DYN)

    def t_map_lit(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        for k in kids:
            self.type_of(k)
        return MAP

    def t_mapinits(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        for k in kids:
            self.type_of(k)
        return DYN

    def t_member_object(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        return DYN

    def t_dot_ident(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        return DYN

    def t_dot_ident_arg(self, node: lark.Tree[lark.Token], kids: list[Any]) -> str:
        return DYN


def type_problems(text: str, tree: lark.Tree[lark.Token]) -> list[str]:
    """What is wrong with the types in the parsed condition ``tree`` (from ``text``).

    Each problem names the sub-expression and, for an unknown field or variable,
    the ones that exist. An expression whose type is known and not boolean is a
    problem too. Empty when nothing is wrong that can be known without a request.
    """
    checker = _Checker(text)
    t = checker.type_of(tree)
    if not checker.problems and t not in (BOOL, DYN):
        whole = " ".join(text.split())
        checker.problem(f"must be true or false, but `{whole}` is {describe(t)}; write a "
                        f"test such as `{_example(whole, t)}`")
    return checker.problems


#: Typed sample requests for :func:`sample_problems`: one with every field present,
#: one without an initiating event (as the broker builds it then).
SAMPLES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("with every field present", {
        "action_class": "sample.class", "target": "ws-0001", "justification": "sample",
        "ttl_seconds": 300, "has_initiating_event": True,
        "initiating_event": {"source": "splunk", "id": "NOTABLE-1", "summary": "sample"},
    }),
    ("without an initiating event", {
        "action_class": "sample.class", "target": "", "justification": "", "ttl_seconds": 0,
        "has_initiating_event": False,
        "initiating_event": {"source": "", "id": "", "summary": ""},
    }),
)
_SAMPLE_IDENTITY = {"spiffe_id": "spiffe://example.org/agent/sample",
                    "trust_domain": "example.org", "path": "/agent/sample",
                    "segments": ["agent", "sample"]}


def sample_problems(program: Any) -> list[str]:
    """Type errors and non-boolean results of a compiled ``program`` on :data:`SAMPLES`.

    Errors that depend on a request's values (an index out of range, a missing
    map key, a failed conversion, division by zero) are not reported: they deny
    at run time.
    """
    for label, request in SAMPLES:
        activation = {"request": json_to_cel(request), "identity": json_to_cel(_SAMPLE_IDENTITY),
                      "now": celtypes.TimestampType(datetime(2026, 1, 1, 12, tzinfo=UTC))}
        try:
            result = program.evaluate(activation)
        except CELEvalError as exc:
            cause = exc.args[1] if len(exc.args) > 1 else None
            if cause is TypeError:  # no such overload; a missing key depends on the values
                detail = str(exc.args[0]).split(" (in activation")[0]
                return [f"fails for a request {label}: {detail}"]
            continue
        except Exception:  # noqa: S112 - depends on the values; denies at run time
            continue
        if not isinstance(result, celtypes.BoolType):
            return [f"must be true or false, but for a request {label} it evaluates to "
                    f"{result!r}"]
    return []


def syntax_problem(text: str, line: int | None, column: int | None, detail: str) -> str:
    """A CEL syntax error shown whole: the message, then the expression with a caret.

    ``line`` and ``column`` are 1-based, as the parser reports them.
    """
    lines = text.splitlines() or [""]
    shown = "\n".join(f"    {ln}" for ln in lines)
    if line is None or column is None or not 1 <= line <= len(lines):
        return f"is not a valid CEL expression: {detail}\n{shown}"
    caret = "    " + " " * (column - 1) + "^"
    before = "\n".join(f"    {ln}" for ln in lines[:line])
    after = "\n".join(f"    {ln}" for ln in lines[line:])
    where = f"line {line}, column {column}" if len(lines) > 1 else f"column {column}"
    return (f"is not a valid CEL expression ({where}): {detail}\n{before}\n{caret}"
            + (f"\n{after}" if after else ""))
