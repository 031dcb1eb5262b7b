"""Pickling pool memory for another process, outside the flow's own messages.

This module owns what a ``ShmBuffer`` becomes in a pickle. The flow's codec
(:mod:`aqueduct._codec`) pickles with a buffer callback and hands the buffers to the engine,
which passes their references along with the message: there a buffer is a ``PickleBuffer``
(:func:`reduce_buffer` while :data:`codec` says so). Any other pickle (``pickle.dumps`` with any
protocol, a ``multiprocessing.Queue``, ``copy.deepcopy``) carries a *descriptor* instead, and
the process that loads it maps the same memory, as 1.15 did with ``/dev/shm`` names:

- **Which pool.** The descriptor names the pool by its memfd's inode, and by the pid and
  descriptor number it has in the pickling process. A process that maps that pool already (the
  pickling process itself, a child forked from it) uses its mapping; another one opens
  ``/proc/<pid>/fd/<n>`` and attaches to it under a process index of its own (a ``spawn`` child,
  or any process of the same user). Nothing is named in ``/dev/shm``: the pool is reachable only
  through a process that holds it, by processes the kernel lets open that process's descriptors
  (same user, ``ptrace`` read access). Otherwise loading raises
  :class:`~aqueduct.exceptions.SharedMemoryUnavailableError`: there is no copy to fall back on.
- **Keeping the memory alive in between.** Between ``dumps`` in one process and ``loads`` in
  another, the pickling process may drop the task (``queue.put(task); del task``). So pickling
  takes a reference of its own, in *transit*, and writes a random token into a slot of a small
  board in the pool; the loading process checks the token (refusing a pickle whose memory was
  let go), takes its own reference, then clears the slot; the pickling process drops transit
  references whose slot was cleared the next time it pickles, and when it exits. A pickle that
  is never loaded keeps its memory for as long as the pool exists (it may be loaded after the
  pickling process is gone), and a pickle is loaded once: a second load finds the slot cleared
  and raises.

Loading never runs on anything but what the caller chose to unpickle: this adds no channel that
receives pickles.
"""

from __future__ import annotations

import ctypes
import os
import pickle
import threading
from random import getrandbits
from typing import Any, Dict, List, Tuple

#: ``codec.on`` is true while the flow's codec pickles (buffers go out of band, by reference).
codec = threading.local()

_lock = threading.Lock()
#: pool inode -> this process's boards for that pool
_boards: Dict[Tuple[int, int], List[_Board]] = {}
#: pool inode -> a pool this process attached to through ``/proc`` (a loaded descriptor)
_attached: Dict[Tuple[int, int], Any] = {}
#: id(pool handle) -> the handle (kept, so that the id is not reused) and where its data starts
_bases: Dict[int, Tuple[Any, int]] = {}
#: Boards inherited through ``fork``: the child keeps them referenced forever, since dropping their
#: transit references would drop the parent's references a second time.
_inherited: List[Any] = []


def reduce_buffer(buf: Any) -> Any:
    """What ``buf`` (a ``ShmBuffer``) is pickled as: itself, out of band, in the flow's codec;
    a descriptor anywhere else."""
    if getattr(codec, 'on', False):
        return pickle.PickleBuffer(buf)
    return _Portable(buf)


class _Portable:
    __slots__ = ('buf',)

    def __init__(self, buf: Any):
        self.buf = buf

    def __reduce__(self):
        pool, transit = _owner(self.buf)
        base = _base(pool)
        rel = _address(self.buf) - base
        board_rel, slot, token = _hold(pool, base, transit)
        dev, ino = _inode(pool)
        return (load_buffer, ((os.getpid(), pool.fileno(), dev, ino), rel, len(self.buf), board_rel, slot, token))


def load_buffer(pool_id: tuple, rel: int, length: int, board_rel: int, slot: int, token: int) -> Any:
    """The ``ShmBuffer`` a descriptor made by :class:`_Portable` refers to, in this process."""
    from ..exceptions import SharedMemoryUnavailableError

    pool = _pool_for(pool_id)
    base = _base(pool)
    capacity = pool.capacity
    board_len = _board_len()
    if not (0 <= rel and length > 0 and rel + length <= capacity and 0 <= board_rel <= capacity - board_len):
        raise SharedMemoryUnavailableError('a shared value\'s descriptor lies outside its shared-memory pool')
    if not 0 <= slot < board_len // 8:
        raise SharedMemoryUnavailableError('a shared value\'s descriptor names no transit slot')
    # Both ranges were checked to lie inside the mapping: reading them cannot fault.
    board = (ctypes.c_uint64 * (board_len // 8)).from_address(base + board_rel)
    if board[slot] != token:
        raise SharedMemoryUnavailableError(
            'the shared memory of this pickled value was already let go: the pickle was loaded once before, '
            'or the process that pickled it has exited; pickle the task again'
        )
    view = (ctypes.c_char * length).from_address(base + rel)
    buf = pool.locate(memoryview(view))  # a memoryview fills in the strides the pool asks for
    if buf is None or len(buf) != length:
        raise SharedMemoryUnavailableError('the shared memory of this pickled value is not allocated anymore')
    board[slot] = 0  # our reference is taken: the pickling process may drop its transit one
    if pool_id[0] == os.getpid():
        _sweep_all()  # loaded where it was pickled (``copy.deepcopy``): no need to wait for the next pickle
    return buf


class _Board:
    """One pool page of transit slots, and the transit references they stand for."""

    def __init__(self, pool: Any, base: int):
        self.buf = pool.alloc(_board_len())
        self.words = memoryview(self.buf).cast('Q')
        for i in range(len(self.words)):
            self.words[i] = 0
        self.rel = _address(self.buf) - base
        self.free = list(range(len(self.words) - 1, -1, -1))
        self.out: Dict[int, Tuple[int, Any]] = {}

    def sweep(self) -> None:
        words = self.words
        for slot in [s for s, (token, _) in self.out.items() if words[s] != token]:
            del self.out[slot]
            self.free.append(slot)


def _hold(pool: Any, base: int, transit: Any) -> Tuple[int, int, int]:
    """Keeps ``transit`` (a reference just taken) until the loading process clears its slot."""
    with _lock:
        boards = _boards.setdefault(_inode(pool), [])
        board = next((b for b in boards if b.free), None)
        if board is None:
            for b in boards:
                b.sweep()
            board = next((b for b in boards if b.free), None)
        if board is None:
            board = _Board(pool, base)
            boards.append(board)
            _release_at_exit()
        slot = board.free.pop()
        token = getrandbits(63) | 1  # never 0, the cleared value
        board.out[slot] = (token, transit)
        board.words[slot] = token
        return board.rel, slot, token


def _release_at_exit() -> None:
    """Arranges for this process to drop, when it exits, the transit references whose pickles
    were loaded and the boards left empty: a ``multiprocessing`` child (``fork``, ``forkserver``)
    ends with ``os._exit``, where no object is ever dropped. Transit references of pickles not
    loaded yet are kept for as long as the pool exists, since the pickles may still be loaded
    after this process is gone."""
    global _exit_pid
    if _exit_pid == os.getpid():
        return
    _exit_pid = os.getpid()
    from multiprocessing import util

    # After the queues' feeder threads have flushed (their finalizers have priority -5): the
    # pickles they wrote are then all made.
    util.Finalize(None, _drop_released, exitpriority=-10)


def _drop_released() -> None:
    _sweep_all()
    with _lock:
        for key, boards in list(_boards.items()):
            boards[:] = [b for b in boards if b.out]
            for board in boards:
                # Pickles still to be loaded (a result put on a queue just before returning):
                # their memory must outlive this process, so the interpreter's teardown must not
                # drop it. One reference more than anyone will ever drop keeps it for as long as
                # the pool exists.
                ctypes.pythonapi.Py_IncRef(ctypes.py_object(board))
            if not boards:
                del _boards[key]


_exit_pid = 0


def _sweep_all() -> None:
    with _lock:
        for boards in _boards.values():
            for board in boards:
                board.sweep()


def transit_count() -> int:
    """Transit references this process holds (pickled values not loaded yet), for tests."""
    _sweep_all()
    return sum(len(b.out) for boards in _boards.values() for b in boards)


def _board_len() -> int:
    from . import PAGE_SIZE

    return PAGE_SIZE


def _pools() -> List[Any]:
    from . import _pool

    pools = [_pool] if _pool is not None else []
    return pools + [p for p in _attached.values() if p is not _pool]


def _owner(buf: Any) -> Tuple[Any, Any]:
    """The pool handle of this process that maps ``buf``, and a new reference to it."""
    for pool in _pools():
        ref = pool.locate(buf)
        if ref is not None:
            return pool, ref
    raise pickle.PicklingError('this shared value is not in a shared-memory pool this process knows')


def _pool_for(pool_id: tuple) -> Any:
    """This process's handle on the pool ``pool_id`` names, attaching to it if need be."""
    from .. import _core
    from .. import shm as shm_module
    from ..exceptions import SharedMemoryUnavailableError

    pid, fd, dev, ino = pool_id
    for pool in _pools():
        if _inode(pool) == (dev, ino):
            return pool
    with _lock:
        pool = _attached.get((dev, ino))
        if pool is not None:
            return pool
        path = f'/proc/{int(pid)}/fd/{int(fd)}'
        try:
            own = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryUnavailableError(
                f'cannot reach the shared-memory pool of process {pid} ({path}: {exc.strerror}): a pickled shared '
                'value is loaded by a process of the same user while the process that pickled it is alive'
            ) from None
        st = os.fstat(own)
        if (st.st_dev, st.st_ino) != (dev, ino):
            os.close(own)
            raise SharedMemoryUnavailableError(
                f'process {pid} no longer holds the shared-memory pool a pickled value refers to'
            )
        first = _core.Pool.attach(own, 0)  # takes the descriptor; only used to reserve an index
        index = first.reserve_index()
        if index is None:
            raise SharedMemoryUnavailableError('every process index of the shared-memory pool is taken')
        pool = first.as_process(index)
        _attached[(dev, ino)] = pool
        if shm_module._pool is None:
            # Values this process shares then live in the same pool, and go back by reference.
            shm_module._pool = pool
        return pool


def _inode(pool: Any) -> Tuple[int, int]:
    st = os.fstat(pool.fileno())
    return st.st_dev, st.st_ino


def _address(buf: Any) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def _base(pool: Any) -> int:
    """Where the pool's data starts in this process's mapping (the origin of descriptors)."""
    known = _bases.get(id(pool))
    if known is not None and known[0] is pool:
        return known[1]
    from . import PAGE_SIZE

    probe = pool.alloc(1)
    head, _, offset, _ = probe.desc
    base = _address(probe) - head * PAGE_SIZE - offset
    del probe
    _bases[id(pool)] = (pool, base)
    return base


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # it may have been held by another thread at the fork
    # The mappings (and so ``_bases`` and ``_attached``) stay valid in the child; the transit
    # references are the parent's to drop.
    _inherited.append(dict(_boards))
    _boards.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
