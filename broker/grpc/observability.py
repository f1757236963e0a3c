"""Health, metrics and structured logs: what operators and Kubernetes look at.

* The standard gRPC health service (``grpc.health.v1``) reports NOT_SERVING while
  Vault is unreachable or sealed, or the audit log cannot be written, and
  SERVING again when both are back (checked every ``interval`` seconds).
* Prometheus metrics on their own registry (one per broker, so several brokers
  can live in one test process), served over HTTP.
* JSON log lines for log collectors (``--log-format json``).
* Every log record is one line, whatever a caller sent: :class:`EscapeControlChars`
  escapes CR, LF and the other control characters, so no input can forge a log line.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_log = logging.getLogger("credbroker.health")

SERVICES = ("", "credbroker.v1.CredentialBroker", "credbroker.v1.CredentialAdmin",
            "credbroker.v1.Approvals")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.issuance = Counter("credbroker_issuance_total", "Issuance requests by decision",
                                ["action_class", "outcome"], registry=r)
        self.issuance_seconds = Histogram(
            "credbroker_issuance_seconds", "Time to answer an issuance request",
            ["action_class"], registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.live_credentials = Gauge("credbroker_live_credentials",
                                      "Credentials issued and not yet expired or revoked",
                                      registry=r)
        self.revocations = Counter("credbroker_revocations_total", "Revocations by result",
                                   ["result"], registry=r)
        self.pending_approvals = Gauge("credbroker_pending_approvals",
                                       "Approvals waiting for a person", registry=r)
        self.audit_errors = Counter("credbroker_audit_append_errors_total",
                                    "Audit records that could not be made durable", registry=r)
        self.vault_drift_corrected = Counter(
            "credbroker_vault_drift_corrected_total",
            "Managed Vault policies and token roles found changed outside the broker and "
            "rewritten", ["kind"], registry=r)
        self.leader = Gauge("credbroker_leader",
                            "1 while this replica runs the background work (holds the leader "
                            "lock; always, on SQLite)", registry=r)
        self.healthy = Gauge("credbroker_healthy", "1 when Vault and the audit log are usable",
                             registry=r)
        # Exceptions are watched: what becomes routine shows here first. Labels are
        # bounded (action classes of the map, error codes, rules); never the identity,
        # whose values are unbounded (the audit log and `credbroker audit report` have it).
        self.denials = Counter("credbroker_denials_total",
                               "Denied issuance requests by action class and error code",
                               ["action_class", "code"], registry=r)
        self.break_glass = Counter("credbroker_break_glass_total",
                                   "Break-glass uses (issued without approval), by class",
                                   ["action_class"], registry=r)
        self.approval_seconds = Histogram(
            "credbroker_approval_decision_seconds",
            "Time from an approval's request to the decision that closed it, by class",
            ["action_class", "decision"], registry=r,
            buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
        self.approvals_fast = Counter(
            "credbroker_approvals_fast_total",
            "Approvals granted sooner than the rubber-stamp threshold after the request "
            "(CREDBROKER_APPROVAL_FAST_SECONDS, default 30)", ["action_class"], registry=r)
        self.automatic_freezes = Counter(
            "credbroker_automatic_freezes_total",
            "Identities frozen by the broker itself, by the class and rule (on_exceed, "
            "denials) that fired", ["action_class", "rule"], registry=r)
        self.self_freezes = Counter("credbroker_self_freezes_total",
                                    "Workloads that froze themselves (POST /v1/freeze)",
                                    registry=r)

    def serve(self, listen: str) -> Any:
        """Serve /metrics on ``host:port``; returns the HTTP server (``.shutdown()``)."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host, registry=self.registry)
        return server


class HealthMonitor:
    """Keeps the gRPC health service true to what the broker can do right now."""

    def __init__(self, *, checks: dict[str, Callable[[], None]], metrics: Metrics,
                 refresh: Callable[[], None], interval: float = 2.0) -> None:
        self.servicer = health.HealthServicer()
        self._checks = checks
        self._metrics = metrics
        self._refresh = refresh
        self._interval = interval
        self._stop = threading.Event()
        self.problems: list[str] = []

    def add_to(self, server: grpc.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    def check_now(self) -> bool:
        problems = []
        for name, check in self._checks.items():
            try:
                check()
            except Exception as exc:  # any failure means not serving
                problems.append(f"{name}: {exc}")
        status = health_pb2.HealthCheckResponse.NOT_SERVING if problems \
            else health_pb2.HealthCheckResponse.SERVING
        if problems != self.problems:
            if problems:
                _log.error("NOT SERVING: %s", "; ".join(problems))
            else:
                _log.warning("serving again: Vault and the audit log are usable")
        self.problems = problems
        for service in SERVICES:
            self.servicer.set(service, status)
        self._metrics.healthy.set(0 if problems else 1)
        try:
            self._refresh()
        except Exception as exc:
            _log.debug("metrics refresh failed: %s", exc)
        return not problems

    def run(self) -> None:
        self.check_now()
        while not self._stop.wait(self._interval):
            self.check_now()

    def stop(self) -> None:
        self._stop.set()
        self.servicer.enter_graceful_shutdown()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the exception)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00",
                                                                                    "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # The first one is the broker's own; a later one could be text a caller sent.
        for word in record.getMessage().split():
            if word.startswith("request_id="):
                out["request_id"] = word.split("=", 1)[1]
                break
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


#: C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(m: re.Match[str]) -> str:
    c = m.group()
    return _NAMED.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def escape_control(text: str) -> str:
    """``text`` with every control character written as a visible escape (``\\n``, ``\\x1b``)."""
    return _CONTROL.sub(_escape_one, text)


class EscapeControlChars(logging.Filter):
    """Makes each record's message a single line of printable text, for any formatter.

    Attach it to a handler. The formatted message (format string and arguments: a
    request_id, a reason, a justification, an exception message) is escaped with
    :func:`escape_control`. A traceback keeps its lines, but each is escaped and
    indented, so a line of a log never starts with text a caller chose.
    """

    _DONE = "_credbroker_escaped"

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, self._DONE, False):
            return True
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not take the call site down
            message = f"{record.msg!s} (log arguments could not be formatted)"
        record.msg, record.args = escape_control(message), None
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text = "\n".join("    " + escape_control(line)
                                         for line in text.splitlines())
        setattr(record, self._DONE, True)
        return True
