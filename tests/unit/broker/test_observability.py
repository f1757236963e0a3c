"""Log records stay one line each, whatever text a caller put into them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from broker.cli import main as cli
from broker.grpc.observability import EscapeControlChars, JsonFormatter, escape_control

FORGED = "r1\n2026-11-27 12:00:00,000 INFO credbroker.broker request_id=x minted"


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(EscapeControlChars())
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    log = logging.getLogger("credbroker.test.escape")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log, out, handler
    log.removeHandler(handler)


def test_escape_control_makes_every_control_visible() -> None:
    assert escape_control("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape_control("\x00\x1b[31m\x7f\x85") == "\\x00\\x1b[31m\\x7f\\x85"
    assert escape_control("a\u2028b\u2029c") == "a\\u2028b\\u2029c"
    assert escape_control("plain ünïcode, 'quotes' and \\n as text") \
        == "plain ünïcode, 'quotes' and \\n as text"


def test_text_lines_cannot_be_forged(
    logger: tuple[logging.Logger, io.StringIO, logging.Handler]
) -> None:
    log, out, _ = logger
    log.warning("request_id=%s failed: %s", FORGED, "reason\r\nINFO forged too")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("WARNING credbroker.test.escape request_id=r1\\n2026")
    assert "reason\\r\\nINFO forged too" in lines[0]


def test_json_lines_cannot_be_forged(
    logger: tuple[logging.Logger, io.StringIO, logging.Handler]
) -> None:
    log, out, handler = logger
    handler.setFormatter(JsonFormatter())
    log.info("request_id=%s justification=%s", "r1", FORGED)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["request_id"] == "r1"
    assert "\n" not in record["message"] and "\\n2026" in record["message"]


def test_a_traceback_keeps_its_lines_but_none_starts_with_caller_text(
    logger: tuple[logging.Logger, io.StringIO, logging.Handler]
) -> None:
    log, out, _ = logger
    try:
        raise ValueError(FORGED)
    except ValueError:
        log.exception("request_id=%s failed unexpectedly", "r1")
    first, *rest = out.getvalue().splitlines()
    assert first == "ERROR credbroker.test.escape request_id=r1 failed unexpectedly"
    assert rest and all(line.startswith("    ") for line in rest)
    assert "    ValueError: r1" in rest  # the exception's own line break is kept, indented
    assert "    2026-11-27 12:00:00,000 INFO credbroker.broker request_id=x minted" in rest


def test_a_record_is_escaped_once_even_through_two_handlers(
    logger: tuple[logging.Logger, io.StringIO, logging.Handler]
) -> None:
    log, out, _ = logger
    second = io.StringIO()
    other = logging.StreamHandler(second)
    other.addFilter(EscapeControlChars())
    log.addHandler(other)
    try:
        log.info("a\nb")
    finally:
        log.removeHandler(other)
    assert out.getvalue().strip().endswith("a\\nb")
    assert second.getvalue().strip() == "a\\nb"


def test_bad_log_arguments_do_not_raise(
    logger: tuple[logging.Logger, io.StringIO, logging.Handler]
) -> None:
    log, out, _ = logger
    log.info("%d items\n", "not a number")
    assert "could not be formatted" in out.getvalue()
    assert out.getvalue().count("\n") == 1


@pytest.mark.parametrize("json_lines", [False, True])
def test_the_cli_logging_escapes_in_both_formats(json_lines: bool,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[logging.Handler] = []
    monkeypatch.setattr(logging, "basicConfig",
                        lambda **kw: seen.extend(kw["handlers"]))
    cli._logging(False, json_lines)
    (handler,) = seen
    assert any(isinstance(f, EscapeControlChars) for f in handler.filters)
    assert isinstance(handler.formatter, JsonFormatter) == json_lines
