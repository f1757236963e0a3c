"""An asyncio event loop in its own thread, driven from sync code.

The broker runs its ``grpc.aio`` server on one; the sidecar runs its HTTP server, its
``grpc.aio`` channel to the broker and its background tasks on another.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

_log = logging.getLogger("credbroker.loop")

_T = TypeVar("_T")


class LoopThread:
    """An asyncio event loop running in its own (daemon) thread, driven from sync code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coro`` on the loop; block until it is done and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        """Cancel what still runs, stop the loop and join its thread."""
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self.loop.is_running():
            try:
                self.run(cancel_rest(), timeout=5)
            except Exception as exc:  # stopping must go on
                _log.debug("cancelling the loop's tasks: %s", exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
