"""Handlers of the streaming tests (importable by ``spawn`` workers)."""

from __future__ import annotations

import os
import time

import numpy as np
from aqueduct import BaseTask, BaseTaskHandler, emit


class Job(BaseTask):
    def __init__(self, parts: int = 3, mode: str = 'count', pause: float = 0.0):
        super().__init__()
        self.parts = parts
        self.mode = mode
        self.pause = pause
        self.sent = 0
        self.result = None
        self.pid = 0


class Counter(BaseTaskHandler):
    """A generator ``handle``: yields ``(task, i)`` for each task, round-robin over the batch, then
    sets ``result``. ``mode`` picks a misbehaviour; ``closed`` counts generators closed early."""

    def __init__(self) -> None:
        self.closed = 0
        self.refused = 0

    def handle(self, *tasks: Job):
        for task in tasks:
            task.pid = os.getpid()
            if task.mode == 'report':  # answers how the earlier streams ended
                task.result = {'closed': self.closed, 'refused': self.refused}
        streaming = [t for t in tasks if t.mode != 'report']
        try:
            for i in range(max((t.parts for t in streaming), default=0)):
                for task in streaming:
                    if i >= task.parts:
                        continue
                    if task.mode == 'raise' and i == 2:
                        raise ValueError(f'part {i} of {task.parts} went wrong')
                    if task.mode == 'bad_yield':
                        yield 'not a pair'
                    if task.pause:
                        time.sleep(task.pause)  # the work a part takes
                    task.sent = i + 1
                    alive = yield task, {'i': i, 'pid': os.getpid()}
                    if not alive:
                        self.refused += 1
            for task in streaming:
                task.result = f'{task.parts} parts'
        except GeneratorExit:
            self.closed += 1
            raise


class Arrays(BaseTaskHandler):
    """``emit`` with large arrays as parts: ``parts`` arrays of 1 MiB, the i-th filled with i."""

    def handle(self, *tasks: Job) -> None:
        for task in tasks:
            for i in range(task.parts):
                assert emit(task, np.full(1 << 18, i, dtype=np.float32))
            task.result = 'arrays'


class Finish(BaseTaskHandler):
    """A second step: what the first left in the task, seen here."""

    def handle(self, *tasks: Job) -> None:
        for task in tasks:
            task.result = f'finished after {task.sent} parts'


class Stall(BaseTaskHandler):
    """Sends one part, then waits ``pause`` seconds before the result (an idle stream)."""

    def handle(self, *tasks: Job) -> None:
        for task in tasks:
            emit(task, 'first')
        time.sleep(tasks[0].pause)
        for task in tasks:
            task.result = 'late'


def emit_outside_a_handler() -> None:
    emit(Job(), 'part')


class BigText(BaseTaskHandler):
    """Parts too large for a ring record (their pickles go through the pool): 2 MiB strings."""

    def handle(self, *tasks: Job) -> None:
        for task in tasks:
            for i in range(task.parts):
                emit(task, chr(ord('a') + i) * (2 << 20))
            task.result = 'text'
