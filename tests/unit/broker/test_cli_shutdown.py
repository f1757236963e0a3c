"""Shutdown under a deadline: a hanging stop never leaves the process behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

SCRIPT = """
import threading, time
from broker.cli.main import _serve_until_signalled
print("ready", flush=True)
raise SystemExit(_serve_until_signalled(lambda: time.sleep({stop}), deadline=1.0, name="t"))
"""


def _run(stop_seconds: float) -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(stop=stop_seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(10)
    return rc, time.monotonic() - t0


def test_a_clean_stop_exits_zero() -> None:
    rc, took = _run(0.1)
    assert rc == 0 and took < 3


def test_a_hanging_stop_is_cut_off_at_the_deadline() -> None:
    rc, took = _run(3600)
    assert rc == 1 and took < 5
