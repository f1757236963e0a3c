"""The `when` type checker, pinned where mutation testing showed the suite was loose: how
each type is named in a message, which operator applies to which types, the function-call
forms (``size(x)`` as well as ``x.size()``), and the syntax error's layout. Pure: text in,
problems out."""

from __future__ import annotations

import celpy
import pytest

from broker.core import celcheck
from broker.core.celcheck import describe, sample_problems, syntax_problem, type_problems
from broker.core.conditions import Condition, ConditionError

_ENV = celpy.Environment()


def _problems(text: str) -> list[str]:
    return type_problems(text, _ENV.compile(text))


@pytest.mark.parametrize(("t", "words"), [
    ("bool", "true or false"), ("int", "an int"), ("uint", "a uint"), ("double", "a double"),
    ("string", "a string"), ("bytes", "a bytes"), ("null", "null"), ("timestamp", "a timestamp"),
    ("duration", "a duration"), ("map", "a map"), ("dyn", "a value"),
    ("list(dyn)", "a list"), ("list(string)", "a list of strings"), ("list(int)", "a list of ints"),
    ("request.initiating_event", "an object (fields source, id, summary)"),
    ("identity", "an object (fields spiffe_id, trust_domain, path, segments)"),
])
def test_each_type_is_named_in_words_a_reader_knows(t: str, words: str) -> None:
    assert describe(t) == words


@pytest.mark.parametrize(("op", "a", "b", "result"), [
    ("+", "int", "int", "int"), ("+", "double", "double", "double"),
    ("+", "string", "string", "string"), ("+", "bytes", "bytes", "bytes"),
    ("+", "duration", "duration", "duration"), ("+", "list(int)", "list(int)", "list(int)"),
    ("+", "list(int)", "list(string)", "list(dyn)"), ("+", "list(int)", "int", None),
    ("+", "int", "list(int)", None), ("+", "bool", "bool", None),
    ("+", "timestamp", "duration", "timestamp"), ("+", "duration", "timestamp", "timestamp"),
    ("+", "timestamp", "timestamp", None), ("+", "int", "double", None),
    ("+", "dyn", "bool", "dyn"), ("+", "bool", "dyn", "dyn"),
    ("-", "int", "int", "int"), ("-", "uint", "uint", "uint"),
    ("-", "duration", "duration", "duration"), ("-", "string", "string", None),
    ("-", "int", "double", None), ("-", "timestamp", "timestamp", "duration"),
    ("-", "timestamp", "duration", "timestamp"), ("-", "duration", "timestamp", None),
    ("-", "timestamp", "int", None),
    ("%", "int", "int", "int"), ("%", "uint", "uint", "uint"), ("%", "double", "double", None),
    ("%", "int", "uint", None),
    ("*", "int", "int", "int"), ("*", "double", "double", "double"), ("/", "uint", "uint", "uint"),
    ("*", "int", "double", None), ("/", "string", "string", None), ("*", "duration", "duration",
                                                                    None),
])
def test_which_arithmetic_operator_applies_to_which_types(op: str, a: str, b: str,
                                                          result: str | None) -> None:
    assert celcheck._arith(op, a, b) == result


@pytest.mark.parametrize(("a", "b", "same"), [
    ("int", "int", True), ("int", "dyn", True), ("dyn", "string", True),
    ("int", "double", False), ("list(int)", "list(dyn)", True), ("list(dyn)", "list(int)", True),
    ("list(int)", "list(string)", False), ("list(int)", "int", False),
])
def test_which_types_may_meet_in_a_comparison(a: str, b: str, same: bool) -> None:
    assert celcheck._same(a, b) is same


@pytest.mark.parametrize(("t", "example"), [
    ("int", "x <= 300"), ("uint", "x <= 300"), ("double", "x <= 300"),
    ("string", 'x == "..."'), ("timestamp", 'x.getHours("UTC") < 22'),
    ("list(string)", '"agent" in x'), ("duration", "x == ..."), ("map", "x == ..."),
])
def test_the_boolean_suggested_for_a_non_boolean_result_fits_its_type(t: str,
                                                                       example: str) -> None:
    assert celcheck._example("x", t) == example


_FUNCTIONS = ("all, bool, bytes, contains, double, duration, endsWith, exists, exists_one, "
              "filter, getDate, getDayOfMonth, getDayOfWeek, getDayOfYear, getFullYear, "
              "getHours, getMilliseconds, getMinutes, getMonth, getSeconds, has, int, map, "
              "matches, size, startsWith, string, timestamp, type, uint")


@pytest.mark.parametrize(("text", "problems"), [
    # has(): exactly one field
    ("has(request.target, request.justification)",
     ["has() takes one field, e.g. has(request.target)"]),
    ("has(1)", ["has() takes one field, e.g. has(request.target)"]),
    ("has(request)", ["has() takes one field, e.g. has(request.target)"]),
    ("has((request.target))", []),
    ("has(request.target.x)", ["request.target is a string; it has no field x"]),
    # conversions: one argument, and the type they return
    ("int(request.target, 1) == 1", ["int() takes one argument"]),
    ('int(request.target) == "x"', ['`int(request.target) == "x"` compares an int with a '
                                    "string; == needs two values of the same type"]),
    ('string(1) == 1', ["`string(1) == 1` compares a string with an int; == needs two values "
                        "of the same type"]),
    ("type(request.target) == 1", []),  # type() is not typed: nothing is claimed
    # a function conditions cannot call, with and without a near name
    ("lowerAscii(request.target)",
     [f"lowerAscii() is not a function conditions can call; the functions that exist are "
      f"{_FUNCTIONS}"]),
    ("sise(request.target) == 1",
     [f"sise() is not a function conditions can call (did you mean size?); the functions "
      f"that exist are {_FUNCTIONS}"]),
    ("frobnicate(request.nope)",
     ["request.nope is not a field; the fields that exist "
      "are request.action_class, request.target, request.justification, request.ttl_seconds, "
      "request.has_initiating_event, request.initiating_event",
      f"frobnicate() is not a function conditions can call; the functions that exist are "
      f"{_FUNCTIONS}"]),
    # the function form of the receiver calls: the first argument is the receiver
    ("size() == 1", ["size() needs arguments"]),
    ("size(request.ttl_seconds) > 1", ["size(): an int has no size"]),
    ("size(request.target) > 1", []),
    ('startsWith(request.target, "ws")', []),
    ("startsWith(request.target, 1)", ["1 is an int; startsWith() takes a string"]),
    ('getHours(now, "UTC") < 3', []),
    ("getHours(now, 1) < 3", ['1 is an int; getHours() takes a time zone name, e.g. "UTC"']),
    ('now.getHours("UTC", "x") < 1',
     ['now.getHours() takes at most a time zone, e.g. getHours("UTC")']),
    ('duration("1h").getHours() == 1', []),
    ('duration("1h").getFullYear() == 1',
     ['duration("1h").getFullYear(): getFullYear() is for timestamps (now), and this is a '
      "duration"]),
    # indexing
    ('identity.segments["a"] == "x"', ['"a" is a string; a list index must be an int']),
    ('identity.segments[0] == "x"', []),
    # arithmetic results flow on into comparisons
    ("now - now == 1", ["`now - now == 1` compares a duration with an int; == needs two "
                        "values of the same type"]),
    ("[1] + [\"a\"] == 1", ['`[1] + ["a"] == 1` compares a list with an int; == needs two '
                            "values of the same type"]),
    ("1.0 % 2.0 == 0.0", ["`1.0 % 2.0` applies % to a double and a double; CEL defines no "
                          "such operator"]),
])
def test_function_calls_and_operators_are_typed(text: str, problems: list[str]) -> None:
    assert _problems(text) == problems


def test_an_unparenthesized_call_is_followed_to_its_identifier() -> None:
    # ``s`` in the macro is an identifier only when it is nothing else.
    assert _problems('identity.segments.exists(s, s == "agent")') == []
    assert _problems('identity.segments.exists(s + "x", true)') == [
        'identity.segments.exists() takes a variable name and an expression, e.g. '
        'identity.segments.exists(s, s == "agent")']


@pytest.mark.parametrize(("line", "column", "shown"), [
    (None, 3, "is not a valid CEL expression: d\n    a =="),
    (1, None, "is not a valid CEL expression: d\n    a =="),
    (0, 3, "is not a valid CEL expression: d\n    a =="),
    (2, 3, "is not a valid CEL expression: d\n    a =="),
    (1, 4, "is not a valid CEL expression (column 4): d\n    a ==\n       ^"),
])
def test_a_syntax_error_outside_the_text_is_shown_without_a_caret(
        line: int | None, column: int | None, shown: str) -> None:
    assert syntax_problem("a ==", line, column, "d") == shown


def test_a_syntax_error_in_a_multi_line_condition_names_its_line_and_keeps_the_rest() -> None:
    assert syntax_problem("a &&\nb ==\nc", 2, 4, "d") == (
        "is not a valid CEL expression (line 2, column 4): d\n    a &&\n    b ==\n       ^\n"
        "    c")
    assert syntax_problem("a &&\nb ==", 2, 4, "d") == (
        "is not a valid CEL expression (line 2, column 4): d\n    a &&\n    b ==\n       ^")
    assert syntax_problem("", 1, 1, "d") == (
        "is not a valid CEL expression (column 1): d\n    \n    ^")
    assert syntax_problem("", None, None, "d") == "is not a valid CEL expression: d\n    "


def test_the_sample_requests_find_a_type_error_only_on_the_request_without_an_event() -> None:
    # Both samples are tried: this one fails only when has_initiating_event is false.
    prog = _ENV.program(_ENV.compile(
        '{"a": request.has_initiating_event ? 1 : "x"}["a"] + 1 == 2'))
    assert sample_problems(prog) == [
        "fails for a request without an initiating event: found no matching overload for "
        "Token('RULE', 'addition_add') applied to '(<class 'celpy.celtypes.StringType'>, "
        "<class 'celpy.celtypes.IntType'>)'"]
    prog = _ENV.program(_ENV.compile(
        '{"a": request.has_initiating_event ? true : 1}["a"]'))
    assert sample_problems(prog) == ["must be true or false, but for a request without an "
                                     "initiating event it evaluates to IntType(1)"]
    for values in ('{"a": true}[request.target]',  # a missing key
                   "int(request.target) == 1",  # a failed conversion
                   "1 / request.ttl_seconds == 1"):  # division by zero
        assert sample_problems(_ENV.program(_ENV.compile(values))) == [], values


@pytest.mark.parametrize(("text", "problem"), [
    ("request.ttl_seconds < '300'",
     "`request.ttl_seconds < '300'` compares an int with a string; < needs two values of the "
     "same type (write a number without quotes: 300, not '300')"),
    ("request.target + 1 == 2",
     "`request.target + 1` applies + to a string and an int; CEL defines no such operator"),
    ("-request.target == 1", "request.target is a string; `-` needs a number"),
    ("identity.segments.all(s, t, s == t)",
     "identity.segments.all() takes a variable name and an expression, e.g. "
     "identity.segments.all(s, s == \"agent\")"),
    ("request.target.all(s, s == 'a')", "request.target is a string; all() needs a list"),
    ("request.ttl_seconds.startsWith('a')",
     "request.ttl_seconds.startsWith(): startsWith() is for strings, and this is an int"),
])
def test_the_words_a_condition_author_reads(text: str, problem: str) -> None:
    with pytest.raises(ConditionError) as err:
        Condition.compile(text)
    assert err.value.problems == (problem,)
