"""A wall-clock bound on an in-process call (a user reward function): it runs in a daemon thread, the caller
waits at most ``timeout_s``.

A thread, not a worker process: a user reward may hold state, a model or a closure that does not pickle. The cost:
a call that never returns cannot be killed, so its thread is abandoned (daemon: it never blocks the exit), and
while it is still running the same key is not called again (each later batch times out at once). That bounds
the abandoned threads at one per key.

No torch, no Lightning: imported by lit_sapo.rewards.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


class CallTimedOut(Exception):
    """The call did not return within the bound (or its previous call is still running)."""


class BoundedCaller:
    """``call(key, fn, *args)``: fn's value, its exception re-raised, or :class:`CallTimedOut` after ``timeout_s``.

    ``check`` (optional) is called every ``poll_s`` while waiting and may raise to abandon the wait (the trainer's
    SIGTERM check), so a stop request is seen within ``poll_s`` even during a long call.
    """

    def __init__(self, timeout_s: float, check: Callable[[], None] | None = None, poll_s: float = 0.2) -> None:
        if timeout_s <= 0:
            raise ValueError(f"BoundedCaller needs timeout_s > 0, got {timeout_s}")
        self.timeout_s, self.check, self.poll_s = timeout_s, check, poll_s
        self._running: dict[str, threading.Thread] = {}  # key -> the abandoned thread of a timed-out call

    def busy(self, key: str) -> bool:
        thread = self._running.get(key)
        if thread is not None and not thread.is_alive():
            del self._running[key]
            return False
        return thread is not None

    def call(self, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        if self.busy(key):
            raise CallTimedOut(f"{key}: its call from an earlier batch is still running")
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"reward-{key}", daemon=True)
        thread.start()
        deadline = time.monotonic() + self.timeout_s
        while thread.is_alive():
            left = deadline - time.monotonic()
            if left <= 0:
                self._running[key] = thread
                raise CallTimedOut(f"{key}: no result after {self.timeout_s:g} s")
            thread.join(min(self.poll_s, left))
            if self.check is not None and thread.is_alive():
                try:
                    self.check()
                except BaseException:
                    self._running[key] = thread
                    raise
        if "error" in box:
            raise box["error"]
        return box["value"]
