"""Handlers for the review repros of streaming (importable by spawn workers)."""

from __future__ import annotations

import os
import threading
import time

from aqueduct import BaseTask, BaseTaskHandler, emit
from aqueduct.streaming import STREAM_WINDOW


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
    """A part whose pickling takes `pause` seconds; `pickling` is set when it starts."""

    def __init__(self, tag, pause):
        self.tag, self.pause = tag, pause
        self.pickling = threading.Event()

    def __reduce__(self):
        self.pickling.set()
        time.sleep(self.pause)  # the slow work a part can take (a large array, say)
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
                part = SlowPickle('from the thread of A', task.pause)

                def late(task=task, part=part):
                    _log(task, 'thread started')
                    try:
                        r = emit(task, part)
                    except BaseException as e:
                        r = e
                    _log(task, 'thread ' + repr(r))

                t = threading.Thread(target=late, daemon=True)
                t.start()
                part.pickling.wait(10)  # the thread is inside emit, pickling the part
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

        window = threading.Event()

        def helper():
            for i in range(task.parts):
                if i == STREAM_WINDOW:
                    window.set()  # the window is full: this emit waits for room
                emit(task, f'helper {i}')

        t = threading.Thread(target=helper, daemon=True)
        t.start()
        window.wait(10)
        emit(task, 'handle')
        t.join()
        task.result = 'two'
