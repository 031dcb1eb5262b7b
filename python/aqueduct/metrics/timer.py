"""Stopwatches with aqueduct 1.15's interface (``Timer``, ``TransferTimer``, ``timeit``), for
handlers and exporters that time things themselves; the engine times steps on its own clock."""

from __future__ import annotations

import time
from typing import Optional


class Timer:
    """A monotonic stopwatch; ``seconds`` is ``None`` until it has been started and stopped.

        with timeit() as timer:
            work()
        task.metrics.handle_times.add('work', timer.seconds)
    """

    #: Digits ``seconds`` is rounded to (10 µs), as in 1.15.
    precision = 5

    def __init__(self) -> None:
        self._start: Optional[float] = None
        self._stop: Optional[float] = None

    @staticmethod
    def _time() -> float:
        return time.monotonic()

    def start(self) -> None:
        self._start = self._time()

    def stop(self) -> None:
        self._stop = self._time()

    def __enter__(self) -> Timer:
        self.start()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.stop()

    @property
    def seconds(self) -> Optional[float]:
        if self._start is None or self._stop is None:
            return None
        return round(self._stop - self._start, self.precision)


class TransferTimer(Timer):
    """A :class:`Timer` that remembers where the transfer it times started."""

    def __init__(self, transfer_from: str):
        super().__init__()
        self.transfer_from = transfer_from
        self.transfer_to: Optional[str] = None


timeit = Timer
