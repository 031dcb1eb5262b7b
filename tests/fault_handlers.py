"""Handlers for the fault-handling tests (``test_faults``). Module level, so ``spawn`` and
``forkserver`` workers can import them.

A test makes a handler block by giving the task a ``marker`` path: the handler polls for that file
and returns once the test has created it. A task's ``pid_file`` tells the handler to write its
worker's pid there (atomically: a temporary file, then a rename) as soon as it starts, so the test
knows which worker holds the task and that it is running.
"""

from __future__ import annotations

import os
import time

from aqueduct import BaseTask, BaseTaskHandler


class Task(BaseTask):
    def __init__(self, x: int = 0, **fields):
        super().__init__()
        self.x = x
        self.result: int | None = None
        self.pid: int | None = None
        self.__dict__.update(fields)


def write_atomically(path: str, text: str) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        f.write(text)
    os.rename(tmp, path)


class Block(BaseTaskHandler):
    """Copies ``x`` to ``result`` and records the worker's pid. A task with a ``pid_file`` has the
    pid written there first; one with a ``marker`` blocks until that file exists; one with
    ``forever`` set never returns (a hung handler: only a kill ends it)."""

    def handle(self, *tasks: Task) -> None:
        for t in tasks:
            pid_file = getattr(t, 'pid_file', None)
            if pid_file:
                write_atomically(pid_file, str(os.getpid()))
        for t in tasks:
            if getattr(t, 'forever', False):
                while True:
                    time.sleep(0.01)
            marker = getattr(t, 'marker', None)
            if marker:
                while not os.path.exists(marker):
                    time.sleep(0.005)
        for t in tasks:
            t.result = t.x
            t.pid = os.getpid()


class Brief(BaseTaskHandler):
    """Sleeps ``delay`` seconds per batch, then copies ``x`` to ``result``."""

    def __init__(self, delay: float = 0.002):
        self.delay = delay

    def handle(self, *tasks: Task) -> None:
        time.sleep(self.delay)
        for t in tasks:
            t.result = t.x
            t.pid = os.getpid()


class FailOnStart(BaseTaskHandler):
    """``on_start`` raises in every worker or, given a ``claim`` path, only in the worker that
    creates that file first. The others then start normally (a flow some of whose workers are
    ready when the failure comes) or, with ``others_hang``, never finish ``on_start``."""

    def __init__(self, claim: str | None = None, others_hang: bool = False):
        self.claim = claim
        self.others_hang = others_hang

    def on_start(self) -> None:
        if self.claim is not None:
            try:
                os.close(os.open(self.claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                while self.others_hang:
                    time.sleep(0.01)
                return
        raise RuntimeError('the model file is missing')

    def handle(self, *tasks: Task) -> None:  # pragma: no cover - never reached in a failed start
        for t in tasks:
            t.result = t.x
