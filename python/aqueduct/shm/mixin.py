"""``SharedFieldsMixin``: fields of a task that live in shared memory (aqueduct 1.15's
``aqueduct.shm.mixin``; ``BaseTask`` derives from it).

This module owns sharing a field (``share_value``, ``share_value_with_data``, assigning a
``SharedData``), unsharing it on reassignment, and what a task with shared fields pickles as
outside the flow: its state without the shared fields' values, which the loading process
rebuilds from the shared memory (``__getstate__``/``__setstate__``, as in 1.15). The flow's own
codec does not go through these two methods: it writes a task's state itself
(:mod:`aqueduct._codec`).

The shared values are kept in ``task._shared_fields`` (field name -> ``SharedData``), created
on first use, so that a task that shares nothing costs nothing.
"""

from __future__ import annotations

import asyncio
import types
import warnings
from typing import Any, Mapping, Optional, Protocol

from .base import SharedData, SharedValue
from .bytes import BytesSharedData

#: ``share_value_with_data`` refuses a larger declared size unless told otherwise: what aiohttp
#: refuses by default (its ``client_max_size``), so that a caller that forgets the limit does not
#: let a client reserve the pool.
DEFAULT_MAX_PAYLOAD = 1 << 20

#: What ``task._shared_fields`` reads as before anything is shared (read-only: the real dict is
#: made on first use).
_NOTHING_SHARED: Mapping[str, SharedData] = types.MappingProxyType({})


class _SharedClasses(dict):
    """class -> whether its instances are ``SharedData`` (what assigning one to a field does),
    looked up once per class: an ABC's ``isinstance`` costs more than the rest of an assignment."""

    def __missing__(self, cls: type) -> bool:
        shared = self[cls] = issubclass(cls, SharedData)
        return shared


_shared_classes = _SharedClasses()
_object_setattr = object.__setattr__


class HasReadany(Protocol):
    """What :meth:`SharedFieldsMixin.share_value_with_data` reads from (aiohttp's ``StreamReader``)."""

    async def readany(self) -> bytes: ...


def _check_payload_size(size: Any, max_size: Optional[int], capacity: int) -> None:
    """Refuses a declared payload size before anything is reserved for it."""
    from ..exceptions import PayloadTooLargeError

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


class SharedFieldsMixin:
    """Lets a task keep field values in shared memory, so that processes share them."""

    _shared_fields = _NOTHING_SHARED

    def __setattr__(self, key: str, value: Any) -> None:
        # Runs for every field a task's constructor sets: kept to a few cheap lookups.
        if _shared_classes[value.__class__]:
            # 1.15: assigning a shared value shares the field (``task.arr = NPArraySharedData...``).
            self._set_shared_value(key, value)
            return
        shared = self._shared_fields
        if shared and key in shared and value is not self.__dict__.get(key):
            # A new value replaces the shared one (as in 1.15). `task.arr *= 3` assigns the very
            # same array back, and stays shared.
            # Not empty, so the instance's own dict, not the read-only class default.
            del shared[key]  # type: ignore[attr-defined]
            warnings.warn(f'The {key} field value is not shared anymore', stacklevel=2)
        _object_setattr(self, key, value)

    def _set_shared_value(self, field_name: str, shared_value: SharedData) -> None:
        shared = self.__dict__.setdefault('_shared_fields', {})
        self.__dict__[field_name] = shared_value.get_data()
        shared[field_name] = shared_value

    def share_value(self, field_name: str) -> None:
        """Moves the field's value (a numpy array of any dtype, shape and memory order, or
        ``bytes``/``bytearray``) into shared memory.

        A numpy field then *is* a view on shared memory: a handler's in-place changes to it are
        seen in this task after ``process()``. A ``bytes`` field stays ``bytes`` (a type that owns
        its memory): handlers receive it from the shared memory instead of from the message.
        Raises ``ValueError`` for an unknown field, an unsupported type, or a field that is
        already shared. Assigning a new value to the field later unshares it, with a warning.
        """
        if field_name not in self.__dict__ or field_name.startswith('_'):
            raise ValueError(f'Unknown field name {field_name!r}')
        if field_name in self._shared_fields:
            raise ValueError(f'The {field_name} field value is already shared')
        value = self.__dict__[field_name]
        shared = SharedValue.create_from_data(value)
        self.__dict__.setdefault('_shared_fields', {})[field_name] = shared
        if shared.kind == 'ndarray':
            self.__dict__[field_name] = shared.get_data()
        # bytes and bytearray keep the caller's object: a copy of the shared one would be equal.

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
        straight into shared memory and shares them as ``field_name``, a ``bytes`` field (as in
        1.15).

        The field reads as ``bytes`` here and in the handlers. Both are copies made from the
        shared memory; the message to the workers carries a reference to it, not the bytes.
        ``size`` usually comes from the client (``Content-Length``), so it is checked before
        anything is reserved:

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
        from .. import shm
        from ..exceptions import PayloadLengthError, PayloadTimeoutError

        _check_payload_size(size, max_size, shm.pool().capacity)
        if field_name in self._shared_fields:
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
                        # ShmBuffer exports the buffer protocol from Rust; its stub cannot declare it
                        view = memoryview(buf)  # type: ignore[arg-type]
                    view[offset:end] = chunk
                    offset = end
            if offset != size:
                raise PayloadLengthError(f'content is shorter than size={size} (got {offset} bytes)')
            if buf is None:  # an empty body: the pool has no empty extents
                buf = shm.pool().alloc(1)
            shared = BytesSharedData(buf, size, bytes)
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
        self._set_shared_value(field_name, shared)

    # ------------------------------------------------------------ pickling outside the flow

    def __getstate__(self) -> Any:
        """The state without the shared fields' values: ``_shared_fields`` carries them (as
        descriptors of the shared memory), and ``__setstate__`` rebuilds the fields from it."""
        state = object.__getstate__(self)
        own, slots = state if isinstance(state, tuple) else (state, None)
        own = dict(own or {})
        shared = own.get('_shared_fields') or {}
        for name in shared:
            own.pop(name, None)
        own['_shared_fields'] = dict(shared)
        return (own, slots) if slots else own

    def __setstate__(self, state: Any) -> None:
        own, slots = state if isinstance(state, tuple) else (state, None)
        own = dict(own or {})
        shared = own.pop('_shared_fields', None)
        fields = self.__dict__
        fields.update(own)
        for name, value in (slots or {}).items():
            object.__setattr__(self, name, value)
        if shared:  # an empty one is not made: a task that shares nothing has none
            fields['_shared_fields'] = shared
            for name, value in shared.items():
                fields[name] = value.get_data()
