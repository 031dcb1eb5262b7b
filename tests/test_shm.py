"""Shared memory: share_value, share_value_with_data, zero copy without sharing, lifetime."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import psutil
import pytest
from aqueduct import FlowStep, shm
from aqueduct._codec import encode
from aqueduct.exceptions import SharedMemoryExhaustedError, WorkerDiedError

from .conftest import children, python_script
from .handlers import ArrayTask, Describe, Echo, HoldAndDie, MakeOutput, Task, Triple

DTYPES = [
    'uint8', 'int8', 'int16', 'uint16', 'int32', 'uint32', 'int64', 'uint64',
    'float16', 'float32', 'float64', 'longdouble', 'complex64', 'complex128', 'bool',
]  # fmt: skip
# Dtypes that are not numbers, and empty arrays.
OTHER_ARRAYS = {
    'structured': np.array([(i, i / 2, b'ab') for i in range(300)], dtype=[('id', 'i4'), ('w', 'f8'), ('tag', 'S2')]),
    'bytes-strings': np.array([b'abc', b'de'] * 200, dtype='S3'),
    'unicode': np.array(['αβγ', 'x'] * 200, dtype='<U3'),
    'datetime64': np.arange(500).astype('datetime64[s]'),
    'timedelta64': np.arange(500).astype('timedelta64[ms]'),
    'empty': np.zeros(0),
    'empty-2d': np.zeros((0, 3), dtype=np.uint8),
    'empty-fortran': np.asfortranarray(np.zeros((4, 0, 2), dtype=np.int16)),
}


def pool_used() -> int:
    gc.collect()
    return shm.pool().used_bytes


@pytest.fixture
def baseline():
    """Pool bytes in use before the test; the test must give every byte back."""
    before = pool_used()
    yield before
    assert pool_used() == before, 'shared memory leaked'


def named_shm_held(pids) -> set:
    """The ``/dev/shm`` names the processes ``pids`` have open or mapped: only what this flow's
    own processes hold counts (other programs on the machine create and remove theirs)."""
    held = set()
    for pid in pids:
        try:
            with open(f'/proc/{pid}/maps') as maps:
                held.update(line.split(None, 5)[5].strip() for line in maps if '/dev/shm/' in line)
            for fd in os.listdir(f'/proc/{pid}/fd'):
                target = os.readlink(f'/proc/{pid}/fd/{fd}')
                if target.startswith('/dev/shm/'):
                    held.add(target)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass  # exited meanwhile
    return held


def flow_processes() -> list:
    """This process and its descendants (the flow's zygote and workers)."""
    return [os.getpid(), *(p.pid for p in psutil.Process().children(recursive=True))]


def memfd_holders(inode: int) -> set:
    """Pids of the processes (of this user) with a descriptor on, or a mapping of, the memfd
    with this inode."""
    holders = set()
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
            if any(os.stat(f'/proc/{pid}/fd/{fd}').st_ino == inode for fd in fds if _is_memfd(pid, fd)):
                holders.add(int(pid))
                continue
            with open(f'/proc/{pid}/maps') as maps:
                if any('/memfd:' in line and line.split()[4] == str(inode) for line in maps):
                    holders.add(int(pid))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return holders


def _is_memfd(pid: str, fd: str) -> bool:
    try:
        return os.readlink(f'/proc/{pid}/fd/{fd}').startswith('/memfd:')
    except OSError:
        return False


# ------------------------------------------------------------------ share_value


def test_share_value_makes_the_field_a_view_on_shared_memory(baseline):
    t = ArrayTask(np.arange(10, dtype=np.int32))
    t.share_value('arr')
    assert shm.pool().locate(t.arr) is not None
    assert list(t.arr) == list(range(10))


def test_share_value_rejects_unknown_unsupported_and_already_shared_fields(baseline):
    t = ArrayTask(np.zeros(3), name='x', items=[1, 2])
    with pytest.raises(ValueError, match='Unknown field'):
        t.share_value('missing')
    with pytest.raises(ValueError, match='cannot be shared'):
        t.share_value('items')
    with pytest.raises(ValueError, match='cannot be shared'):
        t.share_value('name')
    t.share_value('arr')
    with pytest.raises(ValueError, match='already shared'):
        t.share_value('arr')
    with pytest.raises(ValueError, match='Python objects'):
        ArrayTask(np.array([object()])).share_value('arr')


def test_assigning_a_new_value_unshares_with_a_warning(baseline):
    t = ArrayTask(np.ones(4))
    t.share_value('arr')
    with pytest.warns(UserWarning, match='not shared anymore'):
        t.arr = np.zeros(4)
    assert '_shared_fields' in t.__dict__ and 'arr' not in t._shared_fields


def test_in_place_arithmetic_keeps_the_field_shared(baseline):
    t = ArrayTask(np.ones(4))
    t.share_value('arr')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        t.arr *= 3
    assert 'arr' in t._shared_fields and list(t.arr) == [3.0] * 4


async def test_a_handlers_in_place_change_is_seen_by_the_caller(make_flow, baseline):
    flow = make_flow(Triple())
    t = ArrayTask(np.arange(1000, dtype=np.float64))
    t.share_value('arr')
    mine = t.arr
    await flow.process(t)
    assert t.arr is mine, 'the caller keeps its own view'
    assert np.array_equal(mine, np.arange(1000) * 3)
    assert t.was_shared_view and 'arr' in t._shared_fields
    del mine, t


@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('order', ['C', 'F', 'strided'])
async def test_every_dtype_and_memory_order_round_trips(make_flow, dtype, order, baseline):
    flow = make_flow(Describe())
    base = (np.arange(6 * 50 * 4) % 7).astype(dtype).reshape(6, 50, 4)
    arr = {'C': base, 'F': np.asfortranarray(base), 'strided': base[::2, ::3]}[order]
    t = ArrayTask(arr.copy(order='K') if order != 'strided' else arr)
    t.share_value('arr')
    assert t.arr.dtype == arr.dtype and t.arr.shape == arr.shape and np.array_equal(t.arr, arr)
    if order == 'F':
        assert t.arr.flags.f_contiguous
    await flow.process(t)
    assert t.seen[:2] == (str(np.dtype(dtype)), arr.shape)
    assert t.seen[3] == pytest.approx(float(np.real(arr).astype(np.float64).sum()))
    assert t.in_pool, 'the handler read shared memory in place'
    del t


@pytest.mark.parametrize('name', OTHER_ARRAYS)
async def test_other_dtypes_and_empty_arrays_round_trip(make_flow, name, baseline):
    flow = make_flow(Echo())
    arr = OTHER_ARRAYS[name]
    t = ArrayTask(arr.copy(order='K'))
    t.share_value('arr')
    assert t.arr.dtype == arr.dtype and t.arr.shape == arr.shape and np.array_equal(t.arr, arr)
    await flow.process(t)
    assert t.seen == (arr.dtype, arr.shape)
    assert t.copy.dtype == arr.dtype and np.array_equal(t.copy, arr)
    del t


@pytest.mark.parametrize('kind', [bytes, bytearray])
async def test_bytes_and_bytearray_can_be_shared(make_flow, kind, baseline):
    flow = make_flow(Describe())
    data = kind(os.urandom(200_000))
    t = ArrayTask(data)
    t.share_value('arr')
    assert type(t.arr) is kind and t.arr == data
    await flow.process(t)
    assert t.seen == (kind.__name__, len(data))
    assert t.checksum == sum(data[:: len(data) // 1000])
    assert t.arr == data
    del t


async def test_a_handler_can_share_a_new_output_array(make_flow, baseline):
    flow = make_flow(MakeOutput())
    t = Task(2)
    await flow.process(t)
    assert np.array_equal(t.out, np.arange(100_000, dtype=np.float32) * 2)
    assert 'out' in t._shared_fields and shm.pool().locate(t.out) is not None
    del t


# ------------------------------------------------------------------ share_value_with_data


class Stream:
    """An object with an async ``readany()``, like aiohttp's ``StreamReader``."""

    def __init__(self, data: bytes, chunk: int = 7000):
        self.chunks = [data[i : i + chunk] for i in range(0, len(data), chunk)]

    async def readany(self) -> bytes:
        await asyncio.sleep(0)
        return self.chunks.pop(0) if self.chunks else b''


async def test_share_value_with_data_streams_into_shared_memory(make_flow, baseline):
    flow = make_flow(Describe())
    data = os.urandom(150_001)
    t = ArrayTask()
    await t.share_value_with_data('arr', Stream(data), len(data))
    assert type(t.arr) is bytes and t.arr == data, 'a bytes field, as in 1.15'
    assert shm.pool().locate(t._shared_fields['arr'].buf) is not None, 'kept in shared memory'
    await flow.process(t)
    assert t.seen == ('bytes', len(data)), 'handlers receive bytes'
    assert type(t.arr) is bytes and t.arr == data
    del t


async def test_a_16_mib_body_travels_to_the_workers_by_reference(make_flow, baseline):
    data = os.urandom(16 << 20)
    t = ArrayTask()
    await t.share_value_with_data('arr', Stream(data, chunk=1 << 20), len(data), max_size=None)
    shared = t._shared_fields['arr']
    used = pool_used()
    body, bufs = encode(t)
    assert [b.desc for b in bufs] == [shared.desc], 'the message refers to the shared bytes'
    assert len(body) < 4096, 'the bytes are not in the message'
    assert pool_used() == used, 'nothing copied into the pool'
    del body, bufs
    flow = make_flow(Describe())
    await flow.process(t)
    assert t.seen == ('bytes', len(data)) and t.checksum == sum(data[:: len(data) // 1000])
    assert pool_used() == used
    del t, shared


@pytest.mark.parametrize('size_delta', [-1, +1])
async def test_share_value_with_data_rejects_a_wrong_size_and_leaks_nothing(size_delta, baseline):
    data = os.urandom(100_000)
    t = ArrayTask()
    with pytest.raises(ValueError, match='shorter' if size_delta > 0 else 'longer'):
        await t.share_value_with_data('arr', Stream(data), len(data) + size_delta)
    assert 'arr' not in t.__dict__.get('_shared_fields', {})


# ------------------------------------------------------------------ zero copy without share_value


async def test_large_arrays_travel_out_of_band_and_come_back_as_shared_views(make_flow, baseline):
    flow = make_flow(Describe(), FlowStep(Triple()))
    arr = np.arange(250_000, dtype=np.float64)
    t = ArrayTask(arr.copy())
    await flow.process(t)
    assert t.in_pool and t.was_shared_view, 'each step read the array in place'
    assert np.array_equal(t.arr, arr * 3)
    assert shm.pool().locate(t.arr) is not None, 'the result is a view on shared memory too'
    del t


async def test_small_arrays_stay_inline(make_flow, baseline):
    flow = make_flow(Describe())
    t = ArrayTask(np.arange(10, dtype=np.int8))
    await flow.process(t)
    assert t.in_pool is False
    assert shm.pool().locate(t.arr) is None


def out_of_band(value) -> int:
    """How many buffers a task holding ``value`` sends out of band, through the pool."""
    _, buffers = encode(ArrayTask(value))
    return len(buffers)


def test_large_bytes_travel_out_of_band_and_small_ones_inline(baseline):
    assert out_of_band(os.urandom(shm.threshold())) == 1
    assert out_of_band(os.urandom(shm.threshold() - 1)) == 0
    # A bytearray is pickled inline, as pickle does; share_value places it in the pool.
    assert out_of_band(bytearray(shm.threshold())) == 0


def test_the_threshold_is_configurable(baseline):
    old = shm.threshold()
    arr = np.zeros(4096, dtype=np.uint8)
    try:
        assert out_of_band(arr) == 0
        shm.configure(threshold=1024)
        assert shm.threshold() == 1024
        assert out_of_band(arr) == 1
        with pytest.raises(ValueError):
            shm.configure(threshold=-1)
        with pytest.raises(RuntimeError, match='already exists'):
            shm.configure(pool_size=1 << 30)
    finally:
        shm.configure(threshold=old)


# ------------------------------------------------------------------ lifetime and leaks


async def test_memory_goes_back_when_the_last_reference_is_gone(make_flow):
    flow = make_flow(Describe())
    before = pool_used()
    tasks = [ArrayTask(np.ones(300_000)) for _ in range(8)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    assert pool_used() > before, 'the results hold shared memory'
    kept = tasks[0].arr
    del tasks
    assert pool_used() > before, 'one array is still referenced'
    del kept
    assert pool_used() == before


def test_with_no_warm_budget_freed_memory_goes_back_to_the_kernel_at_once():
    # Pool settings are fixed when the pool is created: a fresh interpreter.
    code = textwrap.dedent(
        """
        import asyncio, gc, os, time
        import numpy as np
        from aqueduct import Flow, shm
        from tests.handlers import ArrayTask, Describe

        def resident():  # bytes of the pool's memfd backed by memory
            return os.fstat(shm.pool().fileno()).st_blocks * 512

        async def main():
            flow = Flow(Describe(), Describe())
            flow.start(timeout=30)
            start = resident()
            t = ArrayTask(np.ones(2 << 20))  # 16 MiB, out of band through both steps and back
            await flow.process(t)
            during = resident()
            del t
            gc.collect()
            deadline = time.monotonic() + 10
            while shm.pool().used_bytes:  # the last worker drops its reference after answering
                assert time.monotonic() < deadline, 'the array is still referenced'
                await asyncio.sleep(0.01)
            print(start, during, resident(), flush=True)
            await flow.stop()

        asyncio.run(main())
        """
    )
    env = {**os.environ, 'AQUEDUCT_SHM_WARM': '0'}
    run = [sys.executable, '-c', code]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60, cwd=os.getcwd(), env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    start, during, after = map(int, out.stdout.split())
    assert during - start >= 16 << 20, 'the array was in the pool'
    assert after - start < 1 << 20, f'{after - start} bytes still resident after the last reference went'


async def test_a_sigkilled_worker_leaks_no_shared_memory(make_flow, baseline):
    flow = make_flow(HoldAndDie())
    t = ArrayTask(np.ones(500_000))
    t.share_value('arr')
    assert named_shm_held(flow_processes()) == set(), 'shared memory is a memfd, never a /dev/shm name'
    with pytest.raises(WorkerDiedError):
        await flow.process(t, timeout_sec=20)
    del t
    assert named_shm_held(flow_processes()) == set(), 'nothing named in /dev/shm, ever'


def test_the_pool_is_bounded_and_says_so():
    code = textwrap.dedent(
        """
        import numpy as np
        from aqueduct import shm
        from aqueduct.exceptions import SharedMemoryExhaustedError
        shm.configure(pool_size=4 << 20)
        t = __import__('tests.handlers', fromlist=['ArrayTask']).ArrayTask(np.ones(1 << 20))
        try:
            t.share_value('arr')
        except SharedMemoryExhaustedError as e:
            print('exhausted:', e)
        """
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60, cwd=os.getcwd())
    assert 'exhausted:' in out.stdout and 'pool holds' in out.stdout, out.stderr


def test_sigkill_of_the_main_process_leaves_no_worker_and_no_shared_memory():
    with python_script(
        """
        import asyncio, os
        import numpy as np
        from aqueduct import Flow, shm
        from tests.handlers import ArrayTask, Describe
        async def main():
            flow = Flow(Describe(), Describe())
            flow.start(timeout=30)
            t = ArrayTask(np.ones(1 << 20))
            t.share_value('arr')
            await flow.process(t)
            print(os.getpid(), os.fstat(shm.pool().fileno()).st_ino, flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
        """
    ) as proc:
        pid, pool_inode = map(int, proc.stdout.readline().split())
        tree = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
        assert len(tree) >= 4, 'main, zygote and two workers'
        assert memfd_holders(pool_inode) == set(tree), 'every process of the flow maps the pool'
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)
        _, alive = psutil.wait_procs([psutil.Process(p) for p in tree[1:] if psutil.pid_exists(p)], timeout=5)
        assert not alive, f'orphaned workers: {alive}'
    # No process anywhere holds or maps the pool's memfd: the kernel has freed it.
    assert memfd_holders(pool_inode) == set()
    assert children() == []


async def test_exhausting_the_pool_fails_the_task_not_the_host(make_flow):
    flow = make_flow(Describe())
    huge = np.ones(shm.pool().capacity // 8 + 1024, dtype=np.float64)
    with pytest.raises(SharedMemoryExhaustedError):
        await flow.process(ArrayTask(huge))
    t = ArrayTask(np.ones(10))
    await flow.process(t)
    assert t.seen[0] == 'float64', 'the flow keeps serving'
