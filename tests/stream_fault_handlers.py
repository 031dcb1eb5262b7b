"""Handlers for the review repros of streaming (importable by spawn workers)."""

from __future__ import annotations

import os
import threading
import time

from aqueduct import BaseTask, BaseTaskHandler, emit


class RJob(BaseTask):
    def __init__(self, mode: str = 'endless', parts: int = 10**9, pause: float = 0.0, log: str = ''):
        super().__init__()
        self.mode = mode
        self.parts = parts
        self.pause = pause
        self.log = log
        self.result = None
        self.sent = 0


def _log(task, line):
    if task.log:
        with open(task.log, 'a') as f:
            f.write(line + '\n')


class SlowPickle:
    """A part whose pickling takes `pause` seconds."""

    def __init__(self, tag, pause):
        self.tag, self.pause = tag, pause

    def __reduce__(self):
        time.sleep(self.pause)
        return (str, (self.tag,))


class Review(BaseTaskHandler):
    def handle(self, *tasks: RJob):
        for task in tasks:
            mode = task.mode
            if mode == 'sleep':
                time.sleep(task.pause)
                task.result = 'slept'
            elif mode == 'endless':
                _log(task, 'start')
                i = 0
                while i < task.parts:
                    if task.pause:
                        time.sleep(task.pause)
                    ok = emit(task, i)
                    i += 1
                    task.sent = i
                    if not ok:
                        _log(task, f'told after {i}')
                        break
                _log(task, f'end {i}')
                task.result = f'{i} parts'
            elif mode == 'thread':
                # A careless handler: a thread emits, handle() returns without joining it.
                def late(task=task):
                    _log(task, 'thread started')
                    try:
                        r = emit(task, SlowPickle('from the thread of A', task.pause))
                    except BaseException as e:
                        r = e
                    _log(task, 'thread ' + repr(r))

                t = threading.Thread(target=late, daemon=True)
                t.start()
                time.sleep(0.05)  # the thread is inside emit (pickling the part)
                task.result = 'returned'
            elif mode == 'plain':
                for i in range(task.parts):
                    emit(task, f'plain {i} of {os.getpid()}')
                    if task.pause:
                        time.sleep(task.pause)
                task.result = 'plain'
            elif mode == 'big':
                emit(task, b'x' * task.parts)
                task.result = 'big'
            elif mode == 'unpicklable':
                emit(task, lambda: 1)
                task.result = 'no'


class BigArrays(BaseTaskHandler):
    """Emits `parts` arrays of 1 MiB (pool buffers), the i-th filled with i."""

    def handle(self, *tasks: RJob):
        import numpy as np

        for task in tasks:
            for i in range(task.parts):
                if not emit(task, np.full(1 << 18, i, dtype=np.float32)):
                    break
            task.result = 'arrays'


class BadPart(BaseTaskHandler):
    """A part with a big array, then something unpicklable."""

    def handle(self, *tasks: RJob):
        import numpy as np

        for task in tasks:
            emit(task, [np.ones(1 << 20), lambda: 1])


class TwoEmitters(BaseTaskHandler):
    """A helper thread emits parts of the task while handle() emits too."""

    def handle(self, *tasks: RJob):
        task = tasks[0]

        def helper():
            for i in range(task.parts):
                emit(task, f'helper {i}')

        t = threading.Thread(target=helper, daemon=True)
        t.start()
        time.sleep(0.2)  # the helper filled the window and waits for room, holding the worker
        emit(task, 'handle')
        t.join()
        task.result = 'two'
