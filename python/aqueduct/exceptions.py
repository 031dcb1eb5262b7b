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


class WorkerStartError(FlowError):
    """A worker's ``on_start`` raised, or the worker exited during start-up."""


class SharedMemoryExhaustedError(FlowError, MemoryError):
    """The shared-memory pool has no room for a payload."""


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
    could be pickled) and the message carries the remote traceback.
    """

    step_name: str = ''
    remote_type: str = ''
    remote_traceback: str = ''

    def __str__(self) -> str:
        return self.args[0] if self.args else ''

    def __reduce__(self):
        return (_rebuild_handler_error, (self.__dict__.get('_remote_payload'),))

    @staticmethod
    def from_remote(payload: bytes) -> HandlerError:
        """Rebuilds the caller-side exception from the bytes a worker sent."""
        exc_bytes, module, qualname, text, tb, step_name = pickle.loads(payload)
        cause = None
        if exc_bytes is not None:
            try:
                cause = pickle.loads(exc_bytes)
            except Exception:  # the type does not exist here, or its state does not unpickle
                cause = None
        remote_type = f'{module}.{qualname}' if module not in ('builtins', '') else qualname
        message = f'{remote_type}: {text}\n\nHandler {step_name} raised; remote traceback:\n{tb}'
        base = type(cause) if cause is not None else _lookup_type(module, qualname)
        err = _instantiate(base, message)
        err.step_name = step_name
        err.remote_type = remote_type
        err.remote_traceback = tb
        err.__dict__['_remote_payload'] = payload
        if cause is not None:
            # Attributes of the original (errno, code, ...) stay reachable on the combined object.
            for key, value in getattr(cause, '__dict__', {}).items():
                err.__dict__.setdefault(key, value)
            err.__cause__ = cause
        return err


_dual_classes: dict[type, type] = {}


def _lookup_type(module: str, qualname: str) -> type | None:
    """The exception type named by the worker, if it exists in this process."""
    try:
        obj: Any = builtins if module == 'builtins' else importlib.import_module(module)
        for part in qualname.split('.'):
            obj = getattr(obj, part)
    except Exception:
        return None
    return obj if isinstance(obj, type) and issubclass(obj, BaseException) else None


def _dual_class(base: type) -> type:
    """``class <Base>(HandlerError, Base)``, created once per type; ``HandlerError`` alone when
    the type cannot be combined (a layout conflict, a final class, not an ``Exception``)."""
    if base is None or not issubclass(base, Exception) or issubclass(base, HandlerError):
        return HandlerError
    cls = _dual_classes.get(base)
    if cls is None:
        try:
            namespace = {'__module__': base.__module__, '__str__': HandlerError.__str__}
            cls = type(base.__name__, (HandlerError, base), namespace)
        except TypeError:
            cls = HandlerError
        _dual_classes[base] = cls
    return cls


def _instantiate(base: type | None, message: str) -> HandlerError:
    cls = _dual_class(base)
    try:
        # Skip the original ``__init__``: its signature is unknown (KeyError, OSError, custom
        # types with required arguments); ``args`` carries the message.
        err = BaseException.__new__(cls)
        BaseException.__init__(err, message)
    except TypeError:
        err = HandlerError(message)
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
    try:
        exc_bytes: bytes | None = pickle.dumps(exc, protocol=5)
        pickle.loads(exc_bytes)
    except Exception:
        exc_bytes = None
    cls = type(exc)
    try:
        text = str(exc)
    except Exception:
        text = '<unprintable>'
    if where:
        text = f'{where} {step_name}: {text}'
    return pickle.dumps((exc_bytes, cls.__module__, cls.__qualname__, text, tb, step_name), protocol=5)
