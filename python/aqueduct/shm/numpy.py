"""``NPArraySharedData``: a numpy array in the pool (aqueduct 1.15's ``aqueduct.shm.numpy``).

``get_data()`` is a view on the shared memory, so in-place changes made in any process that has
the value (a handler, a ``multiprocessing`` child it was pickled to) are seen by all of them.
Any dtype without Python objects, any shape and memory order (1.15: C order only).
"""

from __future__ import annotations

import math
from typing import Any, Tuple

import numpy as np

from .base import SharedMemoryWrapper, SharedValue


class NPArraySharedData(SharedValue):
    """An array of ``shape`` and ``dtype`` over ``shm_wrapper``'s memory."""

    def __init__(self, shm_wrapper: Any, shape: Tuple[int, ...], dtype: Any, order: str = 'C'):
        dtype = np.dtype(dtype)
        if dtype.hasobject:
            raise ValueError('arrays of Python objects cannot be shared: they hold references, not data')
        if order not in ('C', 'F'):
            raise ValueError(f"order must be 'C' or 'F', got {order!r}")
        shape = tuple(shape)
        buffer = shm_wrapper._buffer if isinstance(shm_wrapper, SharedMemoryWrapper) else shm_wrapper
        if len(buffer) < math.prod(shape) * dtype.itemsize:
            raise ValueError(f'{len(buffer)} bytes of shared memory cannot hold an array of {shape} {dtype}')
        super().__init__(buffer, 'ndarray', (dtype, shape, order))

    def get_data(self) -> np.ndarray:
        return self.value()

    @classmethod
    def create_from_data(cls, data: np.ndarray) -> NPArraySharedData:
        if not isinstance(data, np.ndarray):
            raise ValueError(f'NPArraySharedData holds a numpy array, not {type(data).__name__}')
        if data.dtype.hasobject:
            raise ValueError('arrays of Python objects cannot be shared: they hold references, not data')
        order = 'F' if data.flags.f_contiguous and not data.flags.c_contiguous else 'C'
        shared = cls(SharedMemoryWrapper(data.nbytes), data.shape, data.dtype, order)
        shared.value()[...] = data
        return shared
