"""``BytesSharedData``: a ``bytes`` or ``bytearray`` value in the pool (aqueduct 1.15's
``aqueduct.shm.bytes``).

Both types own their memory, so the field never *is* the shared memory: each process reads a
copy of it (``get_data()``), as in 1.15. What the pool saves is the copy into every message:
the task carries a reference to the shared bytes, and a handler's copy is made from them.
"""

from __future__ import annotations

from typing import Any, Type, Union

from .base import SharedMemoryWrapper, SharedValue


class BytesSharedData(SharedValue):
    """``size`` bytes in the pool, read as ``cls_byte`` (``bytes`` or ``bytearray``)."""

    def __init__(self, shm_wrapper: Any, size: int, cls_byte: Type[Union[bytes, bytearray]] = bytes):
        if cls_byte not in (bytes, bytearray):
            raise ValueError(f'cls_byte must be bytes or bytearray, got {cls_byte!r}')
        buffer = shm_wrapper._buffer if isinstance(shm_wrapper, SharedMemoryWrapper) else shm_wrapper
        super().__init__(buffer, cls_byte.__name__, (size,))

    @classmethod
    def create_from_data(cls, data: Union[bytes, bytearray]) -> BytesSharedData:
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f'BytesSharedData holds bytes or bytearray, not {type(data).__name__}')
        wrapper = SharedMemoryWrapper(len(data))
        wrapper.buf[:] = data
        return cls(wrapper, len(data), type(data))
