"""Values in shared memory: aqueduct 1.15's ``aqueduct.shm.base`` names, on the process-wide pool.

This module owns the classes every shared value is built from:

- :class:`SharedData`, the abstract base of what ``task._shared_fields`` holds (``get_data()``,
  ``create_from_data()``), as in 1.15; assigning an instance to a task's field shares the field.
- :class:`SharedValue`, the ``SharedData`` that lives in the pool (one ``ShmBuffer`` and how to
  present it); :class:`~aqueduct.shm.numpy.NPArraySharedData` and
  :class:`~aqueduct.shm.bytes.BytesSharedData` are its two kinds.
- :class:`SharedMemoryWrapper`, ``size`` bytes of the pool (1.15: one ``/dev/shm`` segment).

1.15 gave each value a named ``multiprocessing.shared_memory`` segment with a reference count at
its start (``AtomicCounter``). Here a value is a range of one memfd, whose references the pool
counts per process (and takes back from a worker that dies): there is no per-value counter, and
the names that exposed it raise an error that says so.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, SupportsIndex

from . import _portable


class SharedData(ABC):
    """A value kept in shared memory, whose ``get_data()`` is what the task's field reads as."""

    def __init__(self, shm_wrapper: Any):
        self.shm_wrapper = shm_wrapper

    @abstractmethod
    def get_data(self) -> Any:
        """The value (a view on the shared memory where its type allows it)."""

    @classmethod
    @abstractmethod
    def create_from_data(cls, data: Any) -> SharedData:
        """Copies ``data`` into shared memory."""


class SharedValue(SharedData):
    """A field's value in the pool.

    ``buf`` is the ``ShmBuffer`` holding it (one reference, dropped with this object); ``kind``
    says how to present it: a numpy view (``'ndarray'``; ``meta`` is ``dtype, shape, order``),
    or ``'bytes'``/``'bytearray'`` (``meta`` is the length), copied out of the pool because those
    types own their memory. Pickled by the flow, it travels as an out-of-band buffer: every
    process that receives the task references the same memory. Pickled any other way
    (``pickle.dumps``, a ``multiprocessing.Queue``), it travels as a descriptor that another
    process of this user maps (see :mod:`aqueduct.shm._portable`).
    """

    # No ``__init__`` call from the flow's unpickler: it builds instances with ``_rebuild``, so
    # subclasses keep 1.15's constructor signatures.
    buf: Any
    kind: str
    meta: tuple

    def __init__(self, buf: Any, kind: str, meta: tuple = ()):
        self.buf = buf
        self.kind = kind
        self.meta = meta

    @property
    def desc(self) -> tuple:
        """Where the value lives: equal descriptors mean the same shared memory."""
        return self.buf.desc

    @property
    def shm_wrapper(self) -> SharedMemoryWrapper:
        """1.15's handle on the value's memory: ``shm_wrapper.buf`` is a view of its bytes."""
        return SharedMemoryWrapper._wrap(self.buf, self.nbytes)

    @property
    def nbytes(self) -> int:
        if self.kind == 'ndarray':
            dtype, shape, _ = self.meta
            return math.prod(shape) * dtype.itemsize
        return self.meta[0]

    def value(self, received: bool = False) -> Any:
        """The field's value: a numpy view on the shared memory, or ``bytes``/``bytearray``
        copied out of it. (``received`` is kept for callers of the older signature.)"""
        if self.kind == 'ndarray':
            import numpy as np

            dtype, shape, order = self.meta
            # The buffer is at least one byte (the pool has no empty extents): count the
            # elements, so that an empty array is read as empty.
            return np.frombuffer(self.buf, dtype=dtype, count=math.prod(shape)).reshape(shape, order=order)
        view = memoryview(self.buf)[: self.meta[0]]
        if self.kind == 'bytearray':
            return bytearray(view)
        return bytes(view)

    def get_data(self) -> Any:
        return self.value()

    @classmethod
    def create_from_data(cls, data: Any) -> SharedValue:
        """Copies a numpy array, ``bytes`` or ``bytearray`` into the pool, as the matching kind."""
        if isinstance(data, (bytes, bytearray)):
            from .bytes import BytesSharedData

            return BytesSharedData.create_from_data(data)
        numpy = _numpy()
        if numpy is not None and isinstance(data, numpy.ndarray):
            from .numpy import NPArraySharedData

            return NPArraySharedData.create_from_data(data)
        raise ValueError(
            f'a value of type {type(data).__name__} cannot be shared: use a numpy array, bytes or bytearray'
        )

    def __reduce_ex__(self, protocol: SupportsIndex):
        return (_rebuild, (type(self), _portable.reduce_buffer(self.buf), self.kind, self.meta))

    def __repr__(self) -> str:
        return f'<{type(self).__name__} {self.kind} {self.nbytes} bytes at {self.buf.desc}>'


def _rebuild(cls: type[SharedValue], buf: Any, kind: str, meta: tuple) -> SharedValue:
    value = cls.__new__(cls)
    value.buf = buf
    value.kind = kind
    value.meta = meta
    return value


def _numpy():
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        return None
    return numpy


class SharedMemoryWrapper:
    """``size`` bytes of the pool, writable through :attr:`buf` (1.15: a ``/dev/shm`` segment).

    ``SharedMemoryWrapper(size)`` reserves them; the memory is freed when the last object using
    it, in any process, is gone. There are no named segments to attach to (``shm=``,
    ``shm_name=``) and no per-segment reference count (:attr:`ref_count`).
    """

    def __init__(self, size: int, shm: Any = None, shm_name: Any = None):
        if shm is not None or shm_name is not None:
            raise TypeError(
                'SharedMemoryWrapper(shm=..., shm_name=...): shared memory here is one anonymous memfd pool, '
                'with no named segments to attach to; pickle the wrapper (or the task) to reach it from another process'
            )
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f'size must be an integer >= 0 (bytes), got {size!r}')
        from . import pool

        self._buffer = pool().alloc(max(size, 1))  # the pool has no empty extents
        self._size = size

    @classmethod
    def _wrap(cls, buffer: Any, size: int) -> SharedMemoryWrapper:
        wrapper = cls.__new__(cls)
        wrapper._buffer = buffer
        wrapper._size = size
        return wrapper

    @property
    def buf(self) -> memoryview:
        """The bytes, writable, as a ``memoryview`` of the shared memory."""
        # ShmBuffer exports the buffer protocol from Rust; its stub cannot declare it (see _core.pyi)
        return memoryview(self._buffer)[: self._size]  # type: ignore[arg-type]

    @property
    def ref_count(self) -> int:
        raise NotImplementedError(
            'SharedMemoryWrapper.ref_count: the pool counts references per process, not per value, and does not '
            'expose a count; use aqueduct.shm.stats() to watch shared memory in use'
        )

    def __reduce__(self):
        return (SharedMemoryWrapper._wrap, (_portable.reduce_buffer(self._buffer), self._size))


class AtomicCounter:
    """1.15's reference count at the start of each shared-memory segment (cffi atomics)."""

    def __init__(self, *args: Any, **kwargs: Any):
        _no_atomic_counter()

    @staticmethod
    def size() -> int:
        _no_atomic_counter()
        return 0  # pragma: no cover - unreachable

    # 1.15's methods, importable by name; unreachable, since no instance can be made.
    def inc(self, *args: Any) -> int:
        _no_atomic_counter()
        return 0  # pragma: no cover

    def dec(self, *args: Any) -> int:
        _no_atomic_counter()
        return 0  # pragma: no cover

    def get(self) -> int:
        _no_atomic_counter()
        return 0  # pragma: no cover

    def set(self, *args: Any) -> None:
        _no_atomic_counter()


def _no_atomic_counter() -> None:
    raise NotImplementedError(
        'aqueduct.shm.base.AtomicCounter was aqueduct 1.15\'s per-segment reference count; the pool counts '
        'references itself and has no counter to expose (use aqueduct.shm.stats() for memory in use, and '
        'multiprocessing.Value with a lock for a counter shared between processes)'
    )
