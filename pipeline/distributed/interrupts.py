"""Stopping a sweep's driver: SIGINT (Ctrl+C) and SIGTERM (`ray job stop`, a scheduler) end it the
same way: the runs it has open are closed as KILLED, then the driver unwinds and exits, and
`--resume` continues from the last checkpoints.

`ray job stop` sends SIGTERM to the driver and its children and SIGKILLs them after
RAY_JOB_STOP_WAIT_TIME_S (3 s by default), so the runs are closed first, inside the handler,
before any slow unwinding (Ray and Tune shutting down their actors).

A signal that lands inside a write to the tracking store (`uninterrupted`) is handled as soon as
that write is done: the handler writes too, and cut into the middle of a write it would repeat that
write and wait on the lock the write holds (SQLite's, for up to its busy timeout), past the SIGKILL."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


_requested: list[int] = []  # the stop signal received inside `stop_signals`, if any
_on_stop: list[Callable[[int], None]] = []  # what `stop_signals` calls on a stop signal
_deferred: list[int] = []  # a stop signal received inside `uninterrupted`, handled when it ends
_uninterrupted_depth = 0


class SweepStopped(KeyboardInterrupt):
    """The driver got a stop signal. A KeyboardInterrupt: Tune's `except Exception` clauses (which
    would first stop every trial gracefully) let it through, and where the signal lands inside
    Ray's C++ code, Ray turns it into a KeyboardInterrupt instead of losing it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def stop_requested() -> int | None:
    """The stop signal received, for code that runs on (Tune's callbacks raise SweepStopped
    from it, should the handler's exception have been lost in C code)."""
    return _requested[0] if _requested else None


def _stop(signum: int) -> None:
    try:
        for on_stop in _on_stop:
            on_stop(signum)
    except Exception as exc:  # closing the runs failed: still stop, and say why
        with contextlib.suppress(Exception):
            print(f"While stopping: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    raise SweepStopped(signum)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A block that a stop signal must not cut into (one write to the tracking store): a signal
    that arrives inside it is handled when the outermost such block ends, by raising there."""
    global _uninterrupted_depth
    if threading.current_thread() is not threading.main_thread():  # signal handlers run in the main thread
        yield
        return
    _uninterrupted_depth += 1
    try:
        yield
    finally:
        _uninterrupted_depth -= 1
        if _uninterrupted_depth == 0 and _deferred:
            _stop(_deferred.pop())


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[int], None]) -> Iterator[None]:
    """Within the block, a stop signal calls `on_stop(signum)` and raises SweepStopped in the main
    thread (inside `uninterrupted`: when it ends). A second signal while `on_stop` runs gets the
    previous handler (Ctrl+C twice: out now)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handler(signum, frame):
        for other, old in previous.items():
            signal.signal(other, old)
        _requested.append(signum)
        if _uninterrupted_depth:
            _deferred.append(signum)
            return
        _stop(signum)

    _on_stop.append(on_stop)
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _requested.clear()
        _deferred.clear()
        _on_stop.remove(on_stop)
