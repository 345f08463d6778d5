"""Signs of life inside an epoch, which at 368 px on a CPU takes hours: a bar with images/s and the
time left (one process, on a terminal), or a short line about once a minute (a sweep worker's log,
and only when the epoch runs that long).
"""

from __future__ import annotations

import sys
import time
from typing import Callable


def eta_text(seconds: float) -> str:
    """'42 s', '7 min', '2 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = int(round(seconds / 60))
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


class ProgressLine:
    """Prints `epoch E/N: step S/T (P%), X images/s, about D left` every `every_s` seconds of an epoch;
    an epoch shorter than that prints nothing."""

    def __init__(self, epoch: int, epochs: int, steps: int, every_s: float = 60.0,
                 write: Callable[[str], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.epoch, self.epochs, self.steps, self.every_s = epoch, epochs, steps, every_s
        self.write = write or (lambda text: print(text, flush=True))
        self.clock = clock
        self.start = self.last = clock()
        self.done_steps = self.images = 0

    def step(self, images: int) -> None:
        self.done_steps += 1
        self.images += images
        now = self.clock()
        if now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / self.done_steps * max(self.steps - self.done_steps, 0)
        self.write(f"epoch {self.epoch}/{self.epochs}: step {self.done_steps}/{self.steps} "
                   f"({100 * self.done_steps / max(self.steps, 1):.0f}%), {self.images / elapsed:.1f} images/s, "
                   f"about {eta_text(left)} left")

    def close(self) -> None:
        pass


class ProgressBar:
    """A tqdm bar over the epoch's images: rate in images/s and the time left."""

    def __init__(self, epoch: int, epochs: int, steps: int, batch_size: int):
        from tqdm import tqdm

        self.bar = tqdm(total=steps * batch_size, unit="img", desc=f"epoch {epoch}/{epochs}", leave=False,
                        file=sys.stderr, dynamic_ncols=True)

    def step(self, images: int) -> None:
        self.bar.update(images)

    def close(self) -> None:
        self.bar.close()


class NoProgress:
    def step(self, images: int) -> None:
        pass

    def close(self) -> None:
        pass
