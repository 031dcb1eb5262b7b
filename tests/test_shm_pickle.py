"""Tasks with shared fields pickled outside the flow (``pickle``, ``copy``, ``multiprocessing``
queues) keep sharing their memory, as in aqueduct 1.15; and 1.15's ``aqueduct.shm`` names."""

from __future__ import annotations

import copy
import gc
import multiprocessing
import pickle

import numpy as np
import pytest
from aqueduct import BaseTask, shm
from aqueduct.exceptions import SharedMemoryUnavailableError
from aqueduct.shm import _portable
from aqueduct.shm.base import AtomicCounter, SharedData, SharedMemoryWrapper
from aqueduct.shm.bytes import BytesSharedData
from aqueduct.shm.mixin import SharedFieldsMixin
from aqueduct.shm.numpy import NPArraySharedData

from . import mp_children


class Task(BaseTask):
    def __init__(self):
        super().__init__()
        self.arr = np.arange(6, dtype=np.float64)
        self.body = b'payload'
        self.plain = 'text'


def used() -> int:
    gc.collect()
    return shm.pool().used_bytes


@pytest.fixture
def baseline():
    """Pool bytes in use before the test (transit references included, once loaded): the test
    must give every byte back."""
    # The board of transit slots, made on the first pickle, lives as long as the process; and
    # the transit references of earlier tests' loaded pickles are dropped.
    pickle.loads(pickle.dumps(SharedMemoryWrapper(1)))
    _portable.transit_count()
    before = used()
    yield
    _portable.transit_count()
    assert used() == before, 'shared memory leaked'


def shared_task() -> Task:
    t = Task()
    t.share_value('arr')
    t.share_value('body')
    return t


# ------------------------------------------------------------------ pickle, copy


@pytest.mark.parametrize('protocol', [None, 2, 4, 5])
def test_pickle_dumps_with_any_protocol_and_the_copy_shares_memory(protocol, baseline):
    t = shared_task()
    data = pickle.dumps(t) if protocol is None else pickle.dumps(t, protocol)
    assert b'payload' not in data, 'the shared bytes are not in the pickle'
    copy_ = pickle.loads(data)
    assert type(copy_) is Task and copy_.plain == 'text' and copy_.task_id == t.task_id
    assert type(copy_.body) is bytes and copy_.body == b'payload'
    assert sorted(copy_._shared_fields) == ['arr', 'body']
    copy_.arr[0] = 42
    assert t.arr[0] == 42, 'an in-place change in the copy is seen by the original'
    assert _portable.transit_count() == 0, 'loading released the transit reference'
    del t, copy_, data


def test_a_pickle_is_loaded_once(baseline):
    t = shared_task()
    data = pickle.dumps(t)
    first = pickle.loads(data)
    with pytest.raises(SharedMemoryUnavailableError, match='loaded once before'):
        pickle.loads(data)
    del t, first, data


def test_a_pickle_keeps_the_memory_alive_after_the_task_is_gone(baseline):
    t = shared_task()
    t.arr[:] = 5
    data = pickle.dumps(t)
    del t
    gc.collect()
    copy_ = pickle.loads(data)
    assert list(copy_.arr) == [5.0] * 6 and copy_.body == b'payload'
    del copy_, data


def test_deepcopy_shares_and_copy_keeps_the_same_values(baseline):
    t = shared_task()
    deep = copy.deepcopy(t)
    deep.arr[1] = -1
    assert t.arr[1] == -1 and deep.body == b'payload'
    del t, deep


def test_getstate_leaves_the_shared_values_to_shared_fields(baseline):
    t = Task()
    state = t.__getstate__()
    assert state['arr'] is t.arr and state['_shared_fields'] == {}
    t.share_value('arr')
    state = t.__getstate__()
    assert 'arr' not in state and 'arr' in state['_shared_fields'] and state['body'] == b'payload'
    del t, state


def test_the_flow_codec_still_sends_shared_values_out_of_band(baseline):
    from aqueduct._codec import decode, encode

    t = shared_task()
    before = used()
    body, bufs = encode(t)
    # The array field (a view on the shared memory) and its shared value both refer to it.
    assert {b.desc for b in bufs} == {sv.desc for sv in t._shared_fields.values()}
    assert used() == before, 'nothing was copied into the pool'
    copy_ = decode(body, bufs)
    copy_.arr[2] = 9
    assert t.arr[2] == 9 and copy_.body == b'payload'
    assert _portable.transit_count() == 0, 'no transit reference: the engine carries the references'
    del t, copy_, body, bufs


# ------------------------------------------------------------------ multiprocessing queues


@pytest.fixture
def queues():
    """``queues(ctx)``: two queues of that context, closed (pipes and feeder threads) at teardown."""
    made = []

    def make(ctx):
        pair = ctx.Queue(), ctx.Queue()
        made.extend(pair)
        return pair

    yield make
    for q in made:
        q.close()
        q.join_thread()
    made.clear()
    gc.collect()  # a queue's write end is closed when the queue is collected


@pytest.mark.parametrize('method', ['fork', 'spawn', 'forkserver'])
def test_a_task_on_a_multiprocessing_queue_shares_memory_with_the_child(method, queues, baseline):
    ctx = multiprocessing.get_context(method)
    q_in, q_out = queues(ctx)
    child = ctx.Process(target=mp_children.write_first_element, args=(q_in, q_out))
    child.start()
    try:
        t = shared_task()
        q_in.put(t)
        assert q_out.get(timeout=30) == ('Task', ['arr', 'body'])
        assert t.arr[0] == 7, 'the child changed the shared array in place'
        q_in.put(None)
        back = q_out.get(timeout=30)
        back.arr[3] = 11
        assert t.arr[3] == 11 and back.body == b'payload', 'the task that came back shares it too'
        q_in.put(None)
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
    # The child dropped its task before returning: with what it pickled back loaded, a child
    # that ends with os._exit (fork, forkserver) leaves nothing behind either.
    del t, back


@pytest.mark.parametrize('method', ['spawn', 'forkserver'])
def test_a_task_put_on_a_queue_by_a_child_that_returns_is_loaded_after_it_is_gone(method, queues):
    ctx = multiprocessing.get_context(method)
    q_in, q_out = queues(ctx)
    child = ctx.Process(target=mp_children.send_back_and_return, args=(q_in, q_out))
    child.start()
    t = shared_task()
    q_in.put(t)
    child.join(30)
    assert child.exitcode == 0
    back = q_out.get(timeout=30)  # the child is gone: its transit reference outlived it
    assert back.arr[4] == 3 == t.arr[4] and back.body == b'payload'
    back.arr[5] = 8
    assert t.arr[5] == 8


def test_an_np_array_shared_data_on_a_queue_is_shared_with_the_child(queues, baseline):
    ctx = multiprocessing.get_context('spawn')
    q_in, q_out = queues(ctx)
    child = ctx.Process(target=mp_children.write_shared_array, args=(q_in, q_out))
    child.start()
    try:
        shared = NPArraySharedData.create_from_data(np.array([1, 2]))
        q_in.put((shared, 5))
        q_out.get(timeout=30)
        assert list(shared.get_data()) == [5, 2]
        q_in.put(None)
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
    del shared


# ------------------------------------------------------------------ 1.15's names


def test_base_task_is_a_shared_fields_mixin():
    assert issubclass(BaseTask, SharedFieldsMixin)
    assert shm.SharedFieldsMixin is SharedFieldsMixin
    assert BaseTask().__dict__.get('_shared_fields') is None, 'nothing allocated for a task that shares nothing'
    assert BaseTask()._shared_fields == {}


def test_np_array_shared_data_as_1_15s_conftest_makes_it(baseline):
    shared = NPArraySharedData.create_from_data(np.array([1, 2]))
    assert isinstance(shared, SharedData)
    view = shared.get_data()
    assert list(view) == [1, 2] and shm.pool().locate(view) is not None
    assert bytes(shared.shm_wrapper.buf) == np.array([1, 2]).tobytes()
    del shared, view


def test_assigning_a_shared_data_shares_the_field(baseline):
    t = Task()
    t.arr = NPArraySharedData.create_from_data(np.array([3.0, 4.0]))
    assert isinstance(t.arr, np.ndarray) and list(t.arr) == [3.0, 4.0]
    assert isinstance(t._shared_fields['arr'], NPArraySharedData)
    t.body = BytesSharedData.create_from_data(bytearray(b'xy'))
    assert t.body == bytearray(b'xy') and type(t.body) is bytearray
    with pytest.warns(UserWarning, match='not shared anymore'):
        t.arr = np.zeros(2)
    assert 'arr' not in t._shared_fields
    del t


def test_shared_memory_wrapper_is_a_range_of_the_pool(baseline):
    wrapper = SharedMemoryWrapper(10)
    wrapper.buf[:3] = b'abc'
    assert bytes(wrapper.buf[:3]) == b'abc' and len(wrapper.buf) == 10
    shared = BytesSharedData(wrapper, 3, bytes)
    assert shared.get_data() == b'abc'
    assert bytes(pickle.loads(pickle.dumps(wrapper)).buf[:3]) == b'abc'
    del wrapper, shared


def test_the_internals_without_an_equivalent_say_so():
    with pytest.raises(NotImplementedError, match='stats'):
        AtomicCounter(memoryview(bytearray(4)))
    with pytest.raises(NotImplementedError, match='stats'):
        AtomicCounter.size()
    with pytest.raises(NotImplementedError, match='stats'):
        _ = SharedMemoryWrapper(1).ref_count
    with pytest.raises(TypeError, match='no named segments'):
        SharedMemoryWrapper(1, shm_name='psm_1234')


def test_a_user_shared_data_subclass_is_kept_as_given():
    class IntSharedData(SharedData):
        def __init__(self, value):
            super().__init__(None)
            self.value = value

        def get_data(self):
            return self.value

        @classmethod
        def create_from_data(cls, data):
            return cls(data)

    target, source = BaseTask(), BaseTask()
    source.foo = IntSharedData.create_from_data(1)
    target.update(source)
    assert target.foo == 1 and target._shared_fields == source._shared_fields
