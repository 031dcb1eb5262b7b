"""Shared memory: the process-wide pool that large payloads travel through.

One pool (a memfd, so nothing named in ``/dev/shm`` and nothing a SIGKILL can leak) serves
every flow of the main process and all their workers. Numpy arrays and ``bytes`` fields at or
above the threshold travel out of band through it: one copy in, then only descriptors move
between steps and back (pickle protocol 5 buffers). A ``bytearray`` is pickled inline unless it
is shared with ``share_value``. ``task.share_value(field)``
places a field in the pool ahead of time, so that a handler's in-place changes are seen by the
caller.

Configure before the first flow starts or the first value is shared, with :func:`configure` or
the environment:

- ``AQUEDUCT_SHM_POOL_SIZE``: bytes the pool may hold (default 1 GiB). When it is full, placing
  a payload raises :class:`~aqueduct.exceptions.SharedMemoryExhaustedError`.
- ``AQUEDUCT_SHM_THRESHOLD``: smallest buffer sent out of band (default 64 KiB); smaller ones
  are pickled inline, where a copy costs less than a descriptor.
- ``AQUEDUCT_SHM_WARM``: bytes of freed pages kept resident for reuse (default 256 MiB); freed
  pages beyond it are given back to the kernel at once. Reusing warm pages is what makes a
  16 MiB copy cost 0.5 ms instead of 13 ms.

The submodules are aqueduct 1.15's names for shared values, on this pool: :mod:`.base`
(``SharedData``, ``SharedMemoryWrapper``), :mod:`.bytes` (``BytesSharedData``), :mod:`.numpy`
(``NPArraySharedData``) and :mod:`.mixin` (``SharedFieldsMixin``, the base class of
``BaseTask`` that provides ``share_value``). ``docs/migrating.md`` says what differs.
"""

from __future__ import annotations

import os
from typing import Optional

from .. import _core

#: Pages of the pool: large enough to keep its tables small, small enough for images.
PAGE_SIZE = 64 << 10
#: Processes (the main one and all workers of all flows) that may use the pool at once.
MAX_PROCESSES = 1024


def _env_bytes(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        parsed = int(value)
    except ValueError:
        raise ValueError(f'{name} must be a number of bytes, got {value!r}') from None
    if parsed < 0:
        raise ValueError(f'{name} must be >= 0, got {parsed}')
    return parsed


_pool_size = _env_bytes('AQUEDUCT_SHM_POOL_SIZE', 1 << 30)
_threshold = _env_bytes('AQUEDUCT_SHM_THRESHOLD', 64 << 10)
_warm = _env_bytes('AQUEDUCT_SHM_WARM', 256 << 20)
_pool: Optional[_core.Pool] = None


def configure(pool_size: Optional[int] = None, threshold: Optional[int] = None, warm: Optional[int] = None) -> None:
    """Sets the pool's size limit, the out-of-band threshold and the warm-page budget (bytes).

    The size and the budget must be set before the pool exists (the first ``Flow.start()`` or
    shared value); the threshold can change at any time.
    """
    global _pool_size, _threshold, _warm
    for name, value in (('pool_size', pool_size), ('threshold', threshold), ('warm', warm)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f'{name} must be an integer >= 0 (bytes), got {value!r}')
    if (pool_size is not None or warm is not None) and _pool is not None:
        raise RuntimeError('the shared-memory pool already exists; configure it before the first flow starts')
    if pool_size is not None:
        if pool_size < PAGE_SIZE:
            raise ValueError(f'pool_size must be at least one page ({PAGE_SIZE} bytes), got {pool_size}')
        _pool_size = pool_size
    if threshold is not None:
        _threshold = threshold
    if warm is not None:
        _warm = warm


def threshold() -> int:
    """The smallest buffer that travels out of band, in bytes."""
    return _threshold


def pool() -> _core.Pool:
    """This process's handle on the pool; the main process creates it on first use."""
    global _pool
    if _pool is None:
        _pool = _core.Pool.create(_pool_size, PAGE_SIZE, MAX_PROCESSES, _warm)
    return _pool


def attach_worker_pool(fd: int, index: int) -> _core.Pool:
    """In a worker process: attach to the main process's pool as process ``index``."""
    global _pool
    _pool = _core.Pool.attach(fd, index)
    return _pool


def attach_client_pool(fd: int, index: int) -> tuple:
    """In a process that submits tasks to a flow served by another process
    (:mod:`aqueduct.sockets`): the handle on that flow's pool (received as ``fd``, which this
    call takes over) acting as process ``index``, and the process pool it replaced.

    The handle becomes this process's pool (the one ``share_value`` places fields in), so shared
    fields travel by reference and their shared memory is counted as this process's, unless the
    process already uses a different pool (it runs flows of its own): then its shared fields are
    copied into the server's pool when they are sent. A process forked from the flow server's
    parent maps the pool already: the handle reuses that mapping.
    """
    global _pool
    previous = _pool
    if previous is not None and _same_file(previous.fileno(), fd):
        os.close(fd)
        client = previous.as_process(index)
    else:
        client = _core.Pool.attach(fd, index)
    if previous is None or client.fileno() == previous.fileno():
        _pool = client
    else:
        from ..logger import log

        log.warning('this process has a shared-memory pool of its own; shared fields are copied to the flow server')
    return client, previous


def detach_client_pool(client: _core.Pool, previous: Optional[_core.Pool]) -> None:
    """Undoes :func:`attach_client_pool`'s change of the process pool (the client stopped)."""
    global _pool
    if _pool is client and previous is not None:
        _pool = previous


def _same_file(a: int, b: int) -> bool:
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def stats() -> dict:
    """Bytes in use, capacity, and freed bytes kept warm, for monitoring and leak checks."""
    p = pool()
    return {'used': p.used_bytes, 'capacity': p.capacity, 'warm': p.warm_bytes}


def pressure() -> dict:
    """How full the pool is: bytes ``used``, ``capacity`` and their ``ratio`` (0 to 1), for health
    checks. Unlike :func:`stats` it does not create the pool: before it exists, nothing is used
    of the configured size."""
    if _pool is None:
        return {'used': 0, 'capacity': _pool_size, 'ratio': 0.0}
    used, capacity = _pool.used_bytes, _pool.capacity
    return {'used': used, 'capacity': capacity, 'ratio': used / capacity if capacity else 1.0}


# At the end: the mixin's modules use this module's pool functions, so they must be defined first.
from .mixin import SharedFieldsMixin  # noqa: E402

__all__ = [
    'MAX_PROCESSES',
    'PAGE_SIZE',
    'SharedFieldsMixin',
    'attach_client_pool',
    'attach_worker_pool',
    'configure',
    'detach_client_pool',
    'pool',
    'pressure',
    'stats',
    'threshold',
]
