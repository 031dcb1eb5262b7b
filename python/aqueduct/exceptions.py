"""Exceptions raised by aqueduct.

The names of aqueduct 1.15 are kept (``AqueductError``, ``FlowError``, ``NotRunningError``,
``MPStartMethodValueError``, ``BadReferenceCount``); the others are ``FlowError`` subclasses, so
code that catches ``FlowError`` keeps working.

A handler exception reaches the caller as a :class:`HandlerError` that is *also* an instance of
the handler's own exception type (see :meth:`HandlerError.from_remote`): both
``except ValueError`` and ``except FlowError`` catch it.
"""

from __future__ import annotations

import builtins
import importlib
import pickle
from typing import Any


class AqueductError(Exception):
    """Base class of every aqueduct error."""


class FlowError(AqueductError):
    """Something went wrong with a flow or with a task in it."""


class MPStartMethodValueError(FlowError, ValueError):
    """``mp_start_method`` is not one of 'fork', 'spawn', 'forkserver'."""


class NotRunningError(FlowError):
    """The flow is not running (not started yet, stopping or stopped)."""


class BadReferenceCount(AqueductError, ValueError):
    """A shared-memory reference count went wrong."""


class NotSupportedError(AqueductError, NotImplementedError):
    """A name of aqueduct 1.15's pure-Python engine (its queues, its worker loop) that has no
    counterpart here: importable, so code that only imports it keeps working, but using it
    raises this, naming what replaces it."""


class QueueFullError(FlowError):
    """The flow's queue is full and the reject policy is on (answer 503)."""


class TaskSerializationError(FlowError, TypeError):
    """The task cannot be pickled, so it cannot be sent to a worker."""


class TaskTimeoutError(FlowError):
    """The task's ``timeout_sec`` passed before its result came back."""


class WorkerDiedError(FlowError):
    """The worker process that held the task died (SIGKILL, segfault, OOM, ``os._exit``)."""

    def __init__(self, message: str, step_name: str = '', pid: int = 0):
        super().__init__(message)
        self.step_name = step_name
        self.pid = pid

    def __reduce__(self):
        return (type(self), (str(self), self.step_name, self.pid))


class HandlerTimeoutError(WorkerDiedError):
    """The batch holding the task ran longer than its step's ``handle_timeout``: the worker was
    killed (it may have hung) and is being replaced."""


class WorkerStartError(FlowError):
    """A worker's ``on_start`` raised, or the worker exited during start-up."""


class SharedMemoryExhaustedError(FlowError, MemoryError):
    """The shared-memory pool has no room for a payload."""


class SharedMemoryUnavailableError(AqueductError, pickle.UnpicklingError):
    """A shared value pickled outside the flow (``pickle.dumps``, a ``multiprocessing.Queue``)
    cannot be loaded here: this process may not open the pickling process's pool (another user,
    that process has exited), or its memory was let go (the pickle was loaded once already)."""


class PayloadTooLargeError(FlowError, ValueError):
    """A payload declares more bytes than it may have (an HTTP body over the app's limit): refused
    before any shared memory is reserved (answer 413)."""

    def __init__(self, message: str, size: int = 0, max_size: int = 0):
        super().__init__(message)
        self.size = size
        self.max_size = max_size

    def __reduce__(self):
        return (type(self), (str(self), self.size, self.max_size))


class PayloadLengthError(FlowError, ValueError):
    """A streamed payload ended shorter or ran longer than the size it declared (an HTTP body
    that does not match its ``Content-Length``); its shared memory is already freed."""


class LengthRequiredError(PayloadLengthError):
    """A streamed payload must declare its size up front (an HTTP body without a
    ``Content-Length``, e.g. chunked): its shared memory is sized from it (answer 411)."""


class PayloadTimeoutError(FlowError, TimeoutError):
    """A streamed payload did not arrive whole within its time limit (a slow or stalled upload);
    its shared memory is already freed (answer 408)."""


class HandlerError(FlowError):
    """A handler raised while handling the task.

    Instances are created by :meth:`from_remote` as instances of a class that derives from both
    ``HandlerError`` and the handler's exception type, the way Ray's
    ``RayTaskError.as_instanceof_cause()`` works. ``__cause__`` is the original exception (when it
    could be pickled), ``args`` are the original's (so ``errno``, ``filename``, ``exceptions``
    and the like are there too), and the message carries the remote traceback.

    Three kinds of exception cannot be raised to the caller as themselves, and arrive as a
    stand-in whose ``__cause__`` is the original:

    - ``StopIteration``: Python turns it into ``RuntimeError`` when it leaves a coroutine
      (PEP 479) and asyncio refuses it in a future; the caller gets ``HandlerError`` +
      ``RuntimeError``, as a coroutine raising it would give.
    - exceptions that are not ``Exception``s (``SystemExit``, ``KeyboardInterrupt``,
      ``GeneratorExit``, ``asyncio.CancelledError``, ``BaseExceptionGroup``): raised as
      themselves they would stop the caller's server or cancel its task; the caller gets a plain
      ``HandlerError``.
    - a type that cannot be combined with ``HandlerError`` or rebuilt here: the nearest built-in
      base that can be, so ``except <built-in base>`` still catches it.
    """

    step_name: str = ''
    remote_type: str = ''
    remote_traceback: str = ''

    def __str__(self) -> str:
        message = self.__dict__.get('_message')
        if message is not None:
            return message
        return str(self.args[0]) if self.args else ''

    def __reduce__(self):
        return (_rebuild_handler_error, (self.__dict__.get('_remote_payload'),))

    @staticmethod
    def from_remote(payload: bytes) -> HandlerError:
        """Rebuilds the caller-side exception from the bytes a worker sent."""
        exc_bytes, args_bytes, module, qualname, text, tb, step_name, builtin_bases = pickle.loads(payload)
        cause = None
        if exc_bytes is not None:
            try:
                cause = pickle.loads(exc_bytes)
            except Exception:  # the type does not exist here, or its state does not unpickle
                cause = None
            if not isinstance(cause, BaseException):
                cause = None
        remote_type = f'{module}.{qualname}' if module not in ('builtins', '') else qualname
        message = f'{remote_type}: {text}\n\nHandler {step_name} raised; remote traceback:\n{tb}'
        base = type(cause) if cause is not None else _lookup_type(module, qualname)
        candidates: list[type | None] = [base] if base is not None else []
        candidates += [getattr(builtins, name, None) for name in builtin_bases]
        if cause is not None:
            args = _constructor_args(cause)
        else:  # the original's arguments, when they survived pickling on their own
            args = (text,)
            if args_bytes is not None:
                try:
                    args = pickle.loads(args_bytes)
                except Exception:
                    pass
        err = _instantiate(candidates, args, message)
        err.step_name = step_name
        err.remote_type = remote_type
        err.remote_traceback = tb
        err.__dict__['_remote_payload'] = payload
        if cause is not None:
            # Attributes of the original (custom fields, ``__notes__``) stay reachable on the
            # combined object.
            for key, value in getattr(cause, '__dict__', {}).items():
                err.__dict__.setdefault(key, value)
            err.__cause__ = cause
        return err


_dual_classes: dict[type, type | None] = {}


def _constructor_args(exc: BaseException) -> tuple:
    """The arguments that rebuild ``exc``: what its ``__reduce__`` hands to its own class (for
    ``OSError`` that includes ``filename``, which ``args`` leaves out), else ``args``."""
    try:
        reduced = exc.__reduce__()
        if isinstance(reduced, tuple) and len(reduced) > 1 and reduced[0] is type(exc):
            if isinstance(reduced[1], tuple):
                return reduced[1]
    except Exception:
        pass
    return exc.args


def _lookup_type(module: str, qualname: str) -> type | None:
    """The exception type named by the worker, if it exists in this process."""
    try:
        obj: Any = builtins if module == 'builtins' else importlib.import_module(module)
        for part in qualname.split('.'):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def _raisable_base(base: type) -> type | None:
    """The type the caller's exception may derive from besides ``HandlerError``, or ``None``
    for a plain ``HandlerError`` (see the class docstring for why)."""
    if issubclass(base, HandlerError):
        return None
    if issubclass(base, StopIteration):
        return RuntimeError
    if not issubclass(base, Exception):
        return None
    return base


def _dual_class(base: type) -> type | None:
    """``class <Base>(HandlerError, Base)``, created once per type; ``None`` when the type
    cannot be combined (a layout or metaclass conflict, a final class, a raising
    ``__init_subclass__``)."""
    if base in _dual_classes:
        return _dual_classes[base]
    try:
        namespace = {'__module__': base.__module__, '__qualname__': base.__qualname__, '__str__': HandlerError.__str__}
        cls: type | None = type(base.__name__, (HandlerError, base), namespace)
    except Exception:
        cls = None
    _dual_classes[base] = cls
    return cls


def _native_base(cls: type) -> type[BaseException]:
    """The built-in (C-level) exception class nearest ``cls``: whose ``__new__`` and
    ``__init__`` fill the C fields (``StopIteration.value``, ``OSError.errno``, ...)."""
    return next(c for c in cls.__mro__ if c.__module__ == 'builtins' and issubclass(c, BaseException))


def _static_base(cls: type) -> type:
    """The class whose ``__new__`` CPython lets allocate ``cls``: the first built-in one on its
    ``__base__`` chain (for ``(HandlerError, MemoryError)`` that is ``Exception``, for
    ``(HandlerError, OSError)`` it is ``OSError``, whichever lays out the instance)."""
    while cls.__flags__ & _HEAPTYPE:
        base = cls.__base__
        assert base is not None  # only ``object`` has no base, and it is not a heap type
        cls = base
    return cls


_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class created by a class statement or type()


def _instantiate(candidates: list, args: tuple, message: str) -> HandlerError:
    """An instance of the first candidate that can be combined with ``HandlerError`` and
    built, with the original's ``args`` when they fit, or none.

    The user's own ``__new__``/``__init__`` are skipped (their signatures are unknown), but the
    built-in base's are always run: an instance whose C fields were never set crashes CPython
    when raised (``StopIteration`` with a NULL ``value`` in a coroutine did)."""
    for base in candidates:
        if base is None or not (isinstance(base, type) and issubclass(base, BaseException)):
            continue
        raisable = _raisable_base(base)
        if raisable is None:
            break
        cls = _dual_class(raisable)
        if cls is None:
            continue
        native = _native_base(raisable)
        allocator = _static_base(cls)
        for attempt in (args if raisable is base else (message,), ()):
            try:
                err = allocator.__new__(cls, *attempt)
                native.__init__(err, *attempt)
            except Exception:
                continue
            err.__dict__['_message'] = message
            return err
    err = HandlerError(message)
    err.__dict__['_message'] = message
    return err


def _rebuild_handler_error(payload: bytes | None) -> HandlerError:
    if payload is None:
        return HandlerError('handler error (details lost in pickling)')
    return HandlerError.from_remote(payload)


def remote_error_payload(exc: BaseException, step_name: str, where: str = '') -> bytes:
    """What a worker sends for a failed task: the pickled exception when possible, and always
    its type name, message and formatted traceback. ``where`` says what failed when it was not
    the handler itself (``'pickling the result of'``, ``'a handle_condition after'``)."""
    import traceback

    tb = ''.join(traceback.format_exception(exc))
    exc_bytes: bytes | None
    try:
        exc_bytes = pickle.dumps(exc, protocol=5)
        pickle.loads(exc_bytes)
    except Exception:
        exc_bytes = None
    args_bytes: bytes | None = None
    if exc_bytes is None:
        # The type cannot be rebuilt from its pickle (its ``__init__`` takes other arguments):
        # its constructor arguments alone still give the caller ``errno``, ``filename``, ...
        try:
            args_bytes = pickle.dumps(_constructor_args(exc), protocol=5)
            pickle.loads(args_bytes)
        except Exception:
            args_bytes = None
    cls = type(exc)
    try:
        text = str(exc)
    except Exception:
        text = '<unprintable>'
    if where:
        text = f'{where} {step_name}: {text}'
    # The built-in classes it derives from: a caller without the type itself (or unable to
    # rebuild it) still raises something ``except <built-in base>`` catches.
    builtin_bases = [c.__name__ for c in cls.__mro__ if c.__module__ == 'builtins' and c is not cls]
    return pickle.dumps(
        (exc_bytes, args_bytes, cls.__module__, cls.__qualname__, text, tb, step_name, builtin_bases), protocol=5
    )
