"""Tasks and handlers shared by the tests. Module level, so ``spawn`` workers can import them."""

from __future__ import annotations

import os
import time

from aqueduct import BaseTask, BaseTaskHandler


class Task(BaseTask):
    def __init__(self, x: int = 0, **fields):
        super().__init__()
        self.x = x
        self.result: int | None = None
        self.__dict__.update(fields)


class Add(BaseTaskHandler):
    """result = x + amount; records the worker pid and the batch size it saw."""

    def __init__(self, amount: int = 1):
        self.amount = amount

    def handle(self, *tasks: Task) -> None:
        for t in tasks:
            t.result = t.x + self.amount
            t.pid = os.getpid()
            t.batch = len(tasks)


class Double(BaseTaskHandler):
    def handle(self, *tasks: Task) -> None:
        for t in tasks:
            t.result = (t.result if t.result is not None else t.x) * 2
            t.doubled_by = os.getpid()


class Mark(BaseTaskHandler):
    """Appends its name to ``task.path``: shows which steps a task went through."""

    def __init__(self, name: str):
        self.name = name

    def handle(self, *tasks: Task) -> None:
        for t in tasks:
            t.path = getattr(t, 'path', ()) + (self.name,)


class SlowStart(BaseTaskHandler):
    """``on_start`` takes ``delay`` seconds and leaves a mark the tasks can read."""

    def __init__(self, delay: float):
        self.delay = delay
        self.loaded = None

    def on_start(self) -> None:
        time.sleep(self.delay)
        self.loaded = ('model', os.getpid())

    def handle(self, *tasks: Task) -> None:
        for t in tasks:
            t.result = self.loaded


class FailingStart(BaseTaskHandler):
    def on_start(self) -> None:
        raise RuntimeError('model file not found')

    def handle(self, *tasks: Task) -> None:  # pragma: no cover - never reached
        pass


class Sleep(BaseTaskHandler):
    """Sleeps ``task.sleep`` seconds (default ``delay``) per batch; records what it saw."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.seen: list = []

    def handle(self, *tasks: Task) -> None:
        time.sleep(max(getattr(t, 'sleep', self.delay) for t in tasks))
        self.seen.extend(t.x for t in tasks)
        for t in tasks:
            t.result = t.x
            t.batch = len(tasks)
            t.pid = os.getpid()
            t.seen_so_far = list(self.seen)


class Raise(BaseTaskHandler):
    """Raises ``ValueError`` for tasks with ``x < 0``."""

    def handle(self, *tasks: Task) -> None:
        for t in tasks:
            if t.x < 0:
                raise ValueError(f'negative input {t.x}')
            t.result = t.x


def is_even(task: Task) -> bool:
    return task.x % 2 == 0


def is_odd(task: Task) -> bool:
    return task.x % 2 == 1


def never(task: Task) -> bool:
    return False


class ArrayTask(BaseTask):
    def __init__(self, arr=None, **fields):
        super().__init__()
        self.arr = arr
        self.__dict__.update(fields)


class Triple(BaseTaskHandler):
    """Multiplies ``task.arr`` by 3 in place (``*=``), and notes whether it arrived as a view on
    shared memory."""

    def handle(self, *tasks) -> None:
        from aqueduct import shm

        for t in tasks:
            t.arr *= 3
            t.was_shared_view = shm.pool().locate(t.arr) is not None


class Describe(BaseTaskHandler):
    """Records what the handler saw: type, dtype, shape, flags, a checksum."""

    def handle(self, *tasks) -> None:
        import numpy as np
        from aqueduct import shm

        for t in tasks:
            a = t.arr
            t.seen = (type(a).__name__, len(a) if isinstance(a, (bytes, bytearray)) else None)
            if isinstance(a, np.ndarray):
                t.seen = (str(a.dtype), a.shape, a.flags.f_contiguous, float(np.real(a).astype(np.float64).sum()))
                t.in_pool = shm.pool().locate(a) is not None if a.flags.c_contiguous or a.flags.f_contiguous else False
            elif isinstance(a, (bytes, bytearray)):
                t.checksum = sum(a[:: max(1, len(a) // 1000)])


class Echo(BaseTaskHandler):
    """Sends back a private copy of ``task.arr`` made in the worker, and its dtype and shape."""

    def handle(self, *tasks) -> None:
        import numpy as np

        for t in tasks:
            t.copy = np.array(t.arr, copy=True)
            t.seen = (t.arr.dtype, t.arr.shape)


class MakeOutput(BaseTaskHandler):
    """Creates a new array and shares it from the worker."""

    def handle(self, *tasks) -> None:
        import numpy as np

        for t in tasks:
            t.out = np.arange(100_000, dtype=np.float32) * t.x
            t.share_value('out')


class HoldAndDie(BaseTaskHandler):
    """Keeps a reference to the shared array and gets SIGKILLed while handling."""

    def handle(self, *tasks) -> None:
        import os
        import signal

        self.kept = [t.arr for t in tasks]
        os.kill(os.getpid(), signal.SIGKILL)


class NeedsTwoArgs(Exception):
    """An exception that does not survive pickling (its __init__ needs two arguments)."""

    def __init__(self, code, detail):
        super().__init__(f'{code}: {detail}')
        self.code = code


class RaiseOdd(BaseTaskHandler):
    """Raises NeedsTwoArgs for odd x; raises an exception of a class defined on the fly for x=99."""

    def handle(self, *tasks) -> None:
        for t in tasks:
            if t.x == 99:
                ephemeral = type('EphemeralError', (ValueError,), {})
                raise ephemeral('made up in the worker')
            if t.x % 2:
                raise NeedsTwoArgs(t.x, 'odd input')
            t.result = t.x


class Die(BaseTaskHandler):
    """Records its pid in on_start; kills itself (SIGKILL, os._exit, segfault) when asked."""

    def on_start(self) -> None:
        import os

        self.started_in = os.getpid()

    def handle(self, *tasks) -> None:
        import ctypes
        import os
        import signal

        for t in tasks:
            how = getattr(t, 'die', None)
            if how == 'kill':
                os.kill(os.getpid(), signal.SIGKILL)
            elif how == 'exit':
                os._exit(3)
            elif how == 'segfault':
                import faulthandler

                faulthandler.disable()  # a deliberate crash: no traceback dump on stderr
                ctypes.string_at(0)
            elif how == 'sleep':
                import time

                time.sleep(t.x)
            t.result = (os.getpid(), self.started_in)


class Unpicklable(BaseTaskHandler):
    """Puts a lock (unpicklable) in the result."""

    def handle(self, *tasks) -> None:
        import threading

        for t in tasks:
            t.lock = threading.Lock()


def explode(task) -> bool:
    raise KeyError('no such field in this condition')


def is_seven(task) -> bool:
    return task.x == 7


class Nap(BaseTaskHandler):
    """Sleeps 10 ms per batch."""

    def handle(self, *tasks) -> None:
        time.sleep(0.01)
        for t in tasks:
            t.result = t.x


def build_shared_flow():
    """The flow ``python -m aqueduct serve tests.handlers:build_shared_flow`` serves."""
    from aqueduct import Flow, FlowStep

    return Flow(FlowStep(Add(10)), FlowStep(Double(), handle_condition=is_even))


def builtin_exception(name: str) -> BaseException:
    """An instance of the built-in exception class ``name``, with the arguments it needs."""
    import builtins

    cls = getattr(builtins, name)
    if issubclass(cls, UnicodeDecodeError):
        return cls('utf-8', b'\xff', 0, 1, 'made in the worker')
    if issubclass(cls, UnicodeEncodeError):
        return cls('ascii', '\xe9', 0, 1, 'made in the worker')
    if issubclass(cls, UnicodeTranslateError):
        return cls('\xe9', 0, 1, 'made in the worker')
    if issubclass(cls, BaseExceptionGroup):
        return cls('made in the worker', [ValueError('inner')])
    if issubclass(cls, OSError):
        return cls(2, 'made in the worker', 'some/file')
    return cls('made in the worker')


class PathError(FileNotFoundError):
    """An OSError subclass whose constructor takes other arguments than OSError's."""

    def __init__(self, path):
        super().__init__(2, 'no such path', path)


class Exhausted(StopIteration):
    """A StopIteration subclass (what ``next()`` on a user iterator might raise)."""


class KeywordOnly(KeyError):
    def __init__(self, *, key):
        super().__init__(key)


class Picky(ValueError):
    """A type that refuses to be subclassed again: it cannot be combined with HandlerError."""

    def __init_subclass__(cls, **kwargs):
        raise TypeError('Picky is final')


def user_exception(name: str) -> BaseException:
    return {
        'PathError': lambda: PathError('some/file'),
        'Exhausted': lambda: Exhausted('made in the worker'),
        'KeywordOnly': lambda: KeywordOnly(key='k'),
        'Picky': lambda: Picky('made in the worker'),
        'CancelledError': lambda: __import__('asyncio').CancelledError('made in the worker'),
        'next': lambda: next(iter(())),
    }[name]()


class RaiseNamed(BaseTaskHandler):
    """Raises ``builtin_exception(task.name)`` or ``user_exception(task.name)`` by
    ``task.kind``; copies ``x`` to ``result`` for any other kind."""

    def handle(self, *tasks) -> None:
        for t in tasks:
            if t.kind == 'builtin':
                raise builtin_exception(t.name)
            if t.kind == 'user':
                raise user_exception(t.name)
            t.result = t.x


class SlotsTask(BaseTask):
    """A task whose own fields live in ``__slots__`` (one of them name-mangled)."""

    __slots__ = ('x', 'result', '__secret')

    def __init__(self, x: int = 0):
        super().__init__()
        self.x = x
        self.result = None
        self.__secret = 'caller'

    @property
    def secret(self):
        return self.__secret


class SlotsAdd(BaseTaskHandler):
    def handle(self, *tasks) -> None:
        for t in tasks:
            t.result = t.x + 1
            t._SlotsTask__secret = 'worker'


class BlockUntil(BaseTaskHandler):
    """Creates ``task.started`` (a path), then waits until ``task.release`` exists."""

    def handle(self, *tasks) -> None:
        for t in tasks:
            open(t.started, 'w').close()
            while not os.path.exists(t.release):
                time.sleep(0.01)
            t.result = 'released'


def build_blocking_flow():
    """``python -m aqueduct serve tests.handlers:build_blocking_flow``: one blocking step."""
    from aqueduct import Flow

    return Flow(BlockUntil())


class OwnTimings(BaseTaskHandler):
    """Adds a sample of its own to ``task.metrics`` (1.15's way to export a custom timing)."""

    def handle(self, *tasks: Task) -> None:
        for t in tasks:
            t.metrics.handle_times.add('decode', 0.25)
            t.result = t.x
