"""Handlers for the Ray tests: module level, so that Ray's workers import them by name."""

from __future__ import annotations

import os
import time

from aqueduct import BaseTaskHandler


class InPlace(BaseTaskHandler):
    """Doubles ``task.arr`` in place and records that the array it saw was writable."""

    def handle(self, *tasks) -> None:
        for t in tasks:
            t.was_writable = bool(t.arr.flags.writeable)
            t.arr *= 2


class ReadOnly(BaseTaskHandler):
    """Reads ``task.arr``, leaves it alone; records the sum and the actor's pid."""

    def handle(self, *tasks) -> None:
        for t in tasks:
            t.total = float(t.arr.sum())
            t.pid = os.getpid()


class ShareThere(BaseTaskHandler):
    """Makes a new array and shares it, as a handler in a worker process may."""

    def handle(self, *tasks) -> None:
        import numpy as np

        for t in tasks:
            t.out = np.full(50_000, t.x, dtype=np.int64)
            t.share_value('out')


class Busy(BaseTaskHandler):
    """Burns ``task.cpu`` seconds (default ``seconds``) of CPU per batch, or sleeps
    ``task.sleep`` seconds; records its pid and the batch size."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds

    def handle(self, *tasks) -> None:
        sleep = max(getattr(t, 'sleep', 0.0) for t in tasks)
        if sleep:
            time.sleep(sleep)
        end = time.perf_counter() + max(getattr(t, 'cpu', self.seconds) for t in tasks)
        while time.perf_counter() < end:
            pass
        for t in tasks:
            t.result = t.x
            t.pid = os.getpid()
            t.batch = len(tasks)


class Quit(BaseTaskHandler):
    """Calls ``sys.exit`` for ``task.x == 0``: the actor ends, as a worker process would."""

    def handle(self, *tasks) -> None:
        import sys

        for t in tasks:
            if t.x == 0:
                sys.exit(3)
            t.result = t.x


class Streams(BaseTaskHandler):
    """A streaming handler: not something a Ray step can run."""

    def handle(self, *tasks):
        yield from ()


class Where(BaseTaskHandler):
    """Sleeps ``task.sleep`` seconds; records the Ray node it ran on."""

    def handle(self, *tasks) -> None:
        import ray

        time.sleep(max(getattr(t, 'sleep', 0.0) for t in tasks))
        node = ray.get_runtime_context().get_node_id()
        for t in tasks:
            t.result = t.x
            t.node = node


class Emits(BaseTaskHandler):
    """Sends a partial result with ``aqueduct.emit``: not something a Ray step can do."""

    def handle(self, *tasks) -> None:
        from aqueduct import emit

        for t in tasks:
            emit(t, 'part')


def not_skipped(task) -> bool:
    return not getattr(task, 'skip_first', False)


def on_ray(task) -> bool:
    return not getattr(task, 'local_only', False)


class Layout(BaseTaskHandler):
    """Records what the handler saw of ``task.arr`` and ``task.same``: memory order, whether
    they are one array; doubles ``task.arr`` in place; leaves ``task.flagged`` alone."""

    def handle(self, *tasks) -> None:
        for t in tasks:
            t.seen = (bool(t.arr.flags.f_contiguous), t.arr is t.same, bool(t.arr.flags.writeable))
            t.arr *= 2


class Flagged:
    """Looks like an array to duck typing (``flags``, ``dtype``) without being one (a pandas
    Series, a CuPy array)."""

    flags = object()
    dtype = 'float64'

    def __eq__(self, other) -> bool:
        return isinstance(other, Flagged)
