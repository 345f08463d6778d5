"""Stopping a sweep's driver: SIGINT (Ctrl+C) and SIGTERM (`ray job stop`, a scheduler) end it the
same way: the runs it has open are closed as KILLED, then the driver unwinds and exits, and
`--resume` continues from the last checkpoints.

`ray job stop` sends SIGTERM to the driver and its children and SIGKILLs them after
RAY_JOB_STOP_WAIT_TIME_S (3 s by default), so the runs are closed first, inside the handler,
before any slow unwinding (Ray and Tune shutting down their actors)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


_requested: list[int] = []  # the stop signal received inside `stop_signals`, if any


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


@contextlib.contextmanager
def stop_signals(on_stop: Callable[[int], None]) -> Iterator[None]:
    """Within the block, a stop signal calls `on_stop(signum)` and raises SweepStopped in the main
    thread. A second signal while `on_stop` runs gets the previous handler (Ctrl+C twice: out now)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}

    def handler(signum, frame):
        for other, old in previous.items():
            signal.signal(other, old)
        _requested.append(signum)
        try:
            on_stop(signum)
        except Exception as exc:  # closing the runs failed: still stop, and say why
            with contextlib.suppress(Exception):
                print(f"While stopping: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise SweepStopped(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        _requested.clear()
