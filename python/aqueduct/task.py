"""``BaseTask``: the unit of work, and the object results are written back into."""

from __future__ import annotations

import asyncio
import math
import pickle
import warnings
from random import getrandbits
from time import monotonic
from typing import Any, Dict, Optional, Protocol, Set

DEFAULT_PRIORITY = 0
#: ``share_value_with_data`` refuses a larger declared size unless told otherwise: what aiohttp
#: refuses by default (its ``client_max_size``), so that a caller that forgets the limit does not
#: let a client reserve the pool.
DEFAULT_MAX_PAYLOAD = 1 << 20


class HasReadany(Protocol):
    """What :meth:`BaseTask.share_value_with_data` reads from (aiohttp's ``StreamReader``)."""

    async def readany(self) -> bytes: ...


class SharedValue:
    """A field's value in the shared-memory pool.

    ``buf`` is the ``ShmBuffer`` holding it (one reference, released with this object); ``kind``
    says how to present it: a numpy view (``ndarray``; ``meta`` is ``dtype, shape, order``), or
    ``bytes``, ``bytearray`` or ``memoryview`` (``meta`` is the length). Pickled, it travels as
    an out-of-band buffer, so every process that receives the task references the same memory.
    """

    __slots__ = ('buf', 'kind', 'meta')

    def __init__(self, buf, kind: str, meta: tuple = ()):
        self.buf = buf
        self.kind = kind
        self.meta = meta

    @property
    def desc(self) -> tuple:
        """Where the value lives: equal descriptors mean the same shared memory."""
        return self.buf.desc

    def value(self, received: bool = False):
        """The field's value, built on the shared memory (numpy, memoryview) or copied out
        of it (``bytes``, ``bytearray``: those types own their memory). In a process that
        *received* the task, a ``memoryview`` field (from ``share_value_with_data``) reads as
        ``bytes``, as in aqueduct 1.15."""
        if self.kind == 'ndarray':
            import numpy as np

            dtype, shape, order = self.meta
            # The buffer is at least one byte (the pool has no empty extents): count the
            # elements, so that an empty array is read as empty.
            return np.frombuffer(self.buf, dtype=dtype, count=math.prod(shape)).reshape(shape, order=order)
        view = memoryview(self.buf)[: self.meta[0]]
        if self.kind == 'bytes' or (received and self.kind == 'memoryview'):
            return bytes(view)
        if self.kind == 'bytearray':
            return bytearray(view)
        return view.toreadonly()

    def __reduce_ex__(self, protocol):
        return (SharedValue, (pickle.PickleBuffer(self.buf), self.kind, self.meta))


def _share(value: Any) -> tuple:
    """Copies ``value`` into the pool: returns ``(SharedValue, the field's new value)``."""
    from . import shm

    if isinstance(value, (bytes, bytearray)):
        buf = shm.pool().alloc(max(len(value), 1))
        memoryview(buf)[: len(value)] = value
        sv = SharedValue(buf, 'bytes' if isinstance(value, bytes) else 'bytearray', (len(value),))
        # bytes stay bytes in this process (the caller's object); receivers copy theirs out
        # of the pool instead of out of a pickle.
        return sv, value
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        np = None
    if np is not None and isinstance(value, np.ndarray):
        if value.dtype.hasobject:
            raise ValueError('arrays of Python objects cannot be shared: they hold references, not data')
        order = 'F' if value.flags.f_contiguous and not value.flags.c_contiguous else 'C'
        buf = shm.pool().alloc(max(value.nbytes, 1))
        meta = (value.dtype, value.shape, order)
        sv = SharedValue(buf, 'ndarray', meta)
        view = sv.value()
        view[...] = value
        return sv, view
    raise ValueError(f'a value of type {type(value).__name__} cannot be shared: use a numpy array, bytes or bytearray')


def _check_payload_size(size: Any, max_size: Optional[int], capacity: int) -> None:
    """Refuses a declared payload size before anything is reserved for it."""
    from .exceptions import PayloadTooLargeError

    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f'size must be an integer >= 0 (bytes), got {size!r}')
    if max_size is not None and (not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 0):
        raise ValueError(f'max_size must be an integer >= 0 (bytes) or None, got {max_size!r}')
    if max_size is not None and size > max_size:
        raise PayloadTooLargeError(
            f'the payload declares {size} bytes, over the limit of {max_size} bytes', size, max_size
        )
    if size > capacity:
        raise PayloadTooLargeError(
            f'the payload declares {size} bytes, more than the whole shared-memory pool ({capacity} bytes)',
            size,
            capacity,
        )


class _TaskMetricsField:
    """``task.metrics``: aqueduct 1.15's per-task :class:`~aqueduct.metrics.task.TaskMetrics`,
    made on first use, so a task that never touches it carries nothing more to the workers.
    Samples a handler adds to it are exported when the task completes; on the class it reads
    ``None``, as 1.15's class attribute did."""

    def __get__(self, task: Optional[BaseTask], owner: Optional[type] = None) -> Any:
        if task is None:
            return None
        from .metrics.task import TaskMetrics

        # Into the instance dict: later reads find it there, without this descriptor.
        metrics = task.__dict__['metrics'] = TaskMetrics()
        return metrics


class BaseTask:
    """Subclass it with the fields your handlers read and write.

    ``await flow.process(task)`` sends the task through the steps and writes the fields the
    handlers set back into this same object (:meth:`update`).
    """

    task_id: str = ''
    priority: int = DEFAULT_PRIORITY
    expiration_time: Optional[float] = None
    metrics = _TaskMetricsField()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Straight into the instance dict: these are never shared fields, and `__setattr__`
        # would cost a Python call each.
        own = self.__dict__
        own['task_id'] = new_task_id()
        own['priority'] = DEFAULT_PRIORITY
        own['expiration_time'] = None

    def __repr__(self) -> str:
        fields = ', '.join(f'{k}={v!r}' for k, v in self.__dict__.items() if not k.startswith('_'))
        return f'<{type(self).__name__} {fields}>'

    __str__ = __repr__

    def __setattr__(self, key: str, value: Any) -> None:
        shared = self.__dict__.get('_shared_fields')
        if shared and key in shared and value is not self.__dict__.get(key):
            # A new value replaces the shared one (as in 1.15). `task.arr *= 3` assigns the very
            # same array back, and stays shared.
            del shared[key]
            warnings.warn(f'The {key} field value is not shared anymore', stacklevel=2)
        object.__setattr__(self, key, value)

    def set_timeout(self, timeout_sec: float) -> None:
        """The task expires ``timeout_sec`` seconds from now (``process`` sets it)."""
        self.__dict__['expiration_time'] = monotonic() + timeout_sec

    def set_priority(self, priority: int) -> None:
        """Higher is served first; one past the flow's ``queue_priorities`` levels is served at the
        highest (as in aqueduct 1.15)."""
        self.priority = priority

    def is_expired(self) -> bool:
        return self.expiration_time is not None and monotonic() >= self.expiration_time

    # ---------------------------------------------------------------- shared memory

    def share_value(self, field_name: str) -> None:
        """Moves the field's value (a numpy array of any dtype, shape and memory order, or
        ``bytes``/``bytearray``) into shared memory.

        A numpy field then *is* a view on shared memory: a handler's in-place changes to it are
        seen in this task after ``process()``. Raises ``ValueError`` for an unknown field, an
        unsupported type, or a field that is already shared. Assigning a new value to the field
        later unshares it, with a warning.
        """
        if field_name not in self.__dict__ or field_name.startswith('_'):
            raise ValueError(f'Unknown field name {field_name!r}')
        shared = self.__dict__.setdefault('_shared_fields', {})
        if field_name in shared:
            raise ValueError(f'The {field_name} field value is already shared')
        sv, value = _share(self.__dict__[field_name])
        shared[field_name] = sv
        self.__dict__[field_name] = value

    async def share_value_with_data(
        self,
        field_name: str,
        content: HasReadany,
        size: int,
        *,
        max_size: Optional[int] = DEFAULT_MAX_PAYLOAD,
        timeout: Optional[float] = None,
    ) -> None:
        """Reads ``size`` bytes from ``content.readany()`` (aiohttp's ``request.content``)
        straight into shared memory, without an intermediate ``bytes`` object, and shares them
        as ``field_name``.

        The field then reads as a read-only ``memoryview`` of the shared bytes in this process;
        handlers receive ``bytes``. ``size`` usually comes from the client (``Content-Length``),
        so it is checked before anything is reserved:

        - over ``max_size`` (default 1 MiB, aiohttp's default ``client_max_size``; ``None``: no
          limit but the pool's capacity) or over the pool's whole capacity:
          :class:`~aqueduct.exceptions.PayloadTooLargeError`;
        - not an ``int`` (or a ``bool``), or negative: ``ValueError``.

        The memory is reserved when the first bytes of the body arrive, not before, and freed at
        once if the read fails for any reason: content shorter or longer than ``size``
        (:class:`~aqueduct.exceptions.PayloadLengthError`), ``timeout`` seconds passing before the
        whole body is in (:class:`~aqueduct.exceptions.PayloadTimeoutError`), a client that hangs
        up, a cancelled request. A full pool raises
        :class:`~aqueduct.exceptions.SharedMemoryExhaustedError`.
        """
        from . import shm
        from .exceptions import PayloadLengthError, PayloadTimeoutError

        _check_payload_size(size, max_size, shm.pool().capacity)
        shared = self.__dict__.setdefault('_shared_fields', {})
        if field_name in shared:
            raise ValueError(f'The {field_name} field value is already shared')
        buf = view = None
        offset = 0
        try:
            async with asyncio.timeout(timeout) as deadline:
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    end = offset + len(chunk)
                    if end > size:
                        raise PayloadLengthError(f'content is longer than size={size} (got at least {end} bytes)')
                    if view is None:
                        # Reserved on the first bytes of the body, not on the headers: a client
                        # that declares a size and sends nothing holds no memory.
                        buf = shm.pool().alloc(max(size, 1))
                        view = memoryview(buf)
                    view[offset:end] = chunk
                    offset = end
            if offset != size:
                raise PayloadLengthError(f'content is shorter than size={size} (got {offset} bytes)')
            if buf is None:  # an empty body: the pool has no empty extents
                buf = shm.pool().alloc(1)
            sv = SharedValue(buf, 'memoryview', (size,))
        except TimeoutError:
            if not deadline.expired():
                raise
            raise PayloadTimeoutError(f'content did not arrive within {timeout} s ({offset} of {size} bytes)') from None
        finally:
            # Dropped here, whatever happened, rather than with the frame: a failed read's frame
            # lives on in the exception's traceback, and when the caller keeps the exception
            # (aiohttp logs it; the traceback then refers back to it) only the cyclic GC would
            # free the reservation, which may not run for as long as the server does.
            if view is not None:
                view.release()
            buf = view = None
        shared[field_name] = sv
        self.__dict__[field_name] = sv.value()

    # ---------------------------------------------------------------- results

    def update(self, source_task: BaseTask, excluded_fields: Optional[Set[str]] = None) -> None:
        """Copies the fields of ``source_task`` (a processed copy of this task) into this one.

        The bookkeeping fields of ``BaseTask`` itself (``task_id``, ``priority``,
        ``expiration_time``) are not copied, nor are ``excluded_fields``. A shared field that
        still lives in the same shared memory keeps this task's object (which already shows any
        in-place change).
        """
        state = source_task.__dict__
        slots = _slot_names(type(source_task))
        if slots:
            # Fields in ``__slots__`` live outside ``__dict__``: without this their results
            # would be silently lost.
            state = dict(state)
            for name in slots:
                try:
                    state[name] = getattr(source_task, name)
                except AttributeError:  # a slot never assigned
                    pass
        self.update_from_state(state, excluded_fields)

    def update_from_state(self, state: Dict[str, Any], excluded_fields: Optional[Set[str]] = None) -> None:
        """:meth:`update` from the fields of a processed copy, given as its ``__dict__``."""
        immutable = _BASE_FIELDS if not excluded_fields else _BASE_FIELDS | set(excluded_fields)
        theirs = state.get('_shared_fields')
        mine = self.__dict__.get('_shared_fields')
        if not theirs and not mine:
            # Straight into the instance dict, except for names the class defines as data
            # descriptors (properties with setters), which must go through `setattr`.
            own = self.__dict__
            special = _data_descriptors(type(self))
            for field, value in state.items():
                if field not in immutable:
                    if field in special:
                        setattr(self, field, value)
                    else:
                        own[field] = value
            return
        from ._codec import FromShared

        # As in aqueduct 1.15, a field this task shares is never overwritten by the processed
        # copy: it is the same shared memory, already showing any in-place change. A field the
        # handlers shared is taken as they left it, and shared here too.
        theirs = theirs or {}
        mine = dict(mine or {})
        own = self.__dict__
        for field, value in state.items():
            if field in immutable or field == '_shared_fields' or field in mine:
                continue
            if field in theirs:
                mine[field] = theirs[field]
                own[field] = theirs[field].value() if value.__class__ is FromShared else value
            elif value.__class__ is not FromShared:
                setattr(self, field, value)
        own['_shared_fields'] = mine


_descriptor_cache: Dict[type, frozenset] = {}


_slot_cache: Dict[type, tuple] = {}


def _slot_names(cls: type) -> tuple:
    """Attribute names of the ``__slots__`` a task class and its bases declare."""
    names = _slot_cache.get(cls)
    if names is None:
        found = []
        for klass in cls.__mro__:
            declared = klass.__dict__.get('__slots__', ())
            for name in (declared,) if isinstance(declared, str) else declared:
                if name in ('__dict__', '__weakref__'):
                    continue
                if name.startswith('__') and not name.endswith('__'):
                    name = f'_{klass.__name__.lstrip("_")}{name}'  # private names are mangled
                found.append(name)
        names = _slot_cache[cls] = tuple(found)
    return names


def _data_descriptors(cls: type) -> frozenset:
    """Names of the data descriptors (e.g. properties) a task class defines."""
    names = _descriptor_cache.get(cls)
    if names is None:
        names = frozenset(
            name
            for klass in cls.__mro__
            for name, attr in vars(klass).items()
            if hasattr(type(attr), '__set__') and not name.startswith('__')
        )
        _descriptor_cache[cls] = names
    return names


def new_task_id() -> str:
    """A random (version 4) UUID string, like ``str(uuid.uuid4())``.

    Drawn from ``random`` rather than ``os.urandom``: a task id needs uniqueness, not secrecy,
    and this avoids a system call per task. The ``random`` module reseeds itself in every forked
    child, so processes never share a sequence.
    """
    h = '%032x' % ((getrandbits(128) & _UUID4_CLEAR) | _UUID4_SET)
    return f'{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}'


# Version 4 in bits 76-79 and the RFC 4122 variant (0b10) in bits 62-63.
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID4_SET = (0x4 << 76) | (0x2 << 62)

_BASE_FIELDS = frozenset({'task_id', 'priority', 'expiration_time', 'metrics'})

#: aqueduct 1.15 spelled the mixin that provides ``share_value`` this way.
SharedFieldsMixin = BaseTask


class StopTask(BaseTask):
    """Kept for compatibility with code that imports it; the engine stops workers itself."""
