"""The public API of aqueduct on the Rust engine, under ``fork`` and ``spawn``."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import operator
import pickle
import subprocess
import sys
import threading
import time

import pytest
from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowState, FlowStep
from aqueduct.exceptions import (
    FlowError,
    HandlerError,
    MPStartMethodValueError,
    NotRunningError,
    TaskTimeoutError,
    WorkerStartError,
)
from aqueduct.logger import log

from .conftest import children
from .handlers import Add, Double, FailingStart, Mark, Raise, Sleep, SlowStart, Task, is_even, is_odd, never


async def test_a_task_goes_through_every_step_and_results_land_in_the_callers_task(make_flow):
    flow = make_flow(FlowStep(Add(10)), Double())  # a bare handler is a step too
    task = Task(1)
    assert await flow.process(task) is True
    assert task.result == 22
    assert task.pid != task.doubled_by, 'each step runs in its own process'


async def test_state_and_is_running(make_flow):
    flow = make_flow(Add(), start=False)
    assert flow.state is FlowState.STOPPED and not flow.is_running
    flow.start(timeout=30)
    assert flow.state is FlowState.RUNNING and flow.is_running
    await flow.stop()
    assert flow.state is FlowState.STOPPED and not flow.is_running


async def test_process_on_a_flow_that_is_not_running_raises(make_flow):
    flow = make_flow(Add(), start=False)
    with pytest.raises(NotRunningError):
        await flow.process(Task(1))
    flow.start(timeout=30)
    await flow.stop()
    with pytest.raises(NotRunningError):
        await flow.process(Task(1))


async def test_start_returns_after_every_on_start_finished(make_flow):
    flow = make_flow(FlowStep(SlowStart(0.3), nprocs=2))
    tasks = [Task(i) for i in range(6)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    assert all(t.result is not None and t.result[0] == 'model' for t in tasks)


async def test_start_timeout_raises_and_leaves_no_process(make_flow):
    flow = make_flow(FlowStep(SlowStart(30)), start=False)
    with pytest.raises(TimeoutError):
        flow.start(timeout=0.5)
    assert flow.state is FlowState.STOPPED
    assert children() == []


async def test_on_start_failure_fails_start_with_the_cause_and_leaves_no_process(make_flow):
    flow = make_flow(Add(), FailingStart(), start=False)
    with pytest.raises(WorkerStartError, match='model file not found'):
        flow.start(timeout=30)
    assert children() == []
    assert flow.state is FlowState.STOPPED


async def test_timeout_raises_a_flow_error_that_mentions_it(make_flow):
    flow = make_flow(Sleep(2.0))
    with pytest.raises(FlowError, match='[Tt]imeout') as info:
        await flow.process(Task(1), timeout_sec=0.2)
    assert isinstance(info.value, TaskTimeoutError)


async def test_a_cancelled_call_raises_cancelled_error_and_its_task_is_dropped(make_flow):
    flow = make_flow(Sleep(0.3))
    busy = asyncio.ensure_future(flow.process(Task(1)))
    await asyncio.sleep(0)  # one pass of the loop: the call submits, and the idle worker gets it
    doomed = asyncio.ensure_future(flow.process(Task(2)))
    await asyncio.sleep(0)  # the second call is submitted while the worker is busy
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await busy
    probe = Task(3, sleep=0.0)
    await flow.process(probe)
    assert probe.seen_so_far == [1, 3], 'the cancelled task never reached the handler'


async def test_graceful_stop_finishes_tasks_in_flight(make_flow):
    flow = make_flow(FlowStep(Sleep(0.2), nprocs=2))
    calls = [asyncio.ensure_future(flow.process(Task(i))) for i in range(4)]
    await asyncio.sleep(0)  # one pass of the loop: every call is submitted
    await flow.stop(graceful=True)
    results = await asyncio.gather(*calls)
    assert results == [True] * 4
    assert children() == []


async def test_non_graceful_stop_fails_every_pending_call(make_flow):
    flow = make_flow(Sleep(5.0))
    calls = [asyncio.ensure_future(flow.process(Task(i), timeout_sec=30)) for i in range(3)]
    await asyncio.sleep(0)  # one pass of the loop: every call is submitted
    await flow.stop(graceful=False)
    for call in calls:
        with pytest.raises(FlowError):
            await call
    assert children() == []


async def test_stop_twice_is_harmless(make_flow):
    flow = make_flow(Add())
    await flow.stop()
    await flow.stop()
    assert flow.state is FlowState.STOPPED


async def test_handle_condition_routes_tasks_past_steps(make_flow):
    flow = make_flow(
        FlowStep(Mark('a'), handle_condition=is_even),
        FlowStep(Mark('b'), handle_condition=is_odd),
        FlowStep(Mark('c')),
        FlowStep(Mark('never'), handle_condition=never),
    )
    even, odd = Task(2), Task(3)
    await asyncio.gather(flow.process(even), flow.process(odd))
    assert even.path == ('a', 'c')
    assert odd.path == ('b', 'c')


async def test_a_task_no_step_accepts_comes_back_unchanged(make_flow):
    flow = make_flow(FlowStep(Mark('a'), handle_condition=never))
    task = Task(1)
    assert await flow.process(task) is True
    assert not hasattr(task, 'path')


async def test_nprocs_runs_a_step_in_several_processes(make_flow):
    flow = make_flow(FlowStep(Sleep(0.05), nprocs=3))
    tasks = [Task(i) for i in range(12)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    assert len({t.pid for t in tasks}) == 3


async def test_batch_size_is_an_upper_bound_and_timeout_zero_takes_what_is_queued(make_flow):
    flow = make_flow(FlowStep(Sleep(0.1), batch_size=4))
    tasks = [Task(i) for i in range(9)]
    await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    sizes = [t.batch for t in tasks]
    assert max(sizes) <= 4
    assert sizes[0] == 1, 'the first task found an idle worker and went alone, without waiting'
    assert 4 in sizes, 'the backlog went as full batches'


async def test_batch_timeout_fills_a_batch_from_the_first_task(make_flow):
    flow = make_flow(FlowStep(Sleep(0.0), batch_size=8, batch_timeout=0.5))
    early = [Task(i) for i in range(3)]
    first = asyncio.ensure_future(flow.process(early[0]))
    await asyncio.sleep(0.05)  # the scenario: two more tasks arrive 50 ms after the first
    await asyncio.gather(first, *(flow.process(t) for t in early[1:]))
    assert [t.batch for t in early] == [3, 3, 3], 'arrivals within the timeout share one batch, not full'
    full = [Task(i) for i in range(8)]
    await asyncio.gather(*(flow.process(t) for t in full))
    assert {t.batch for t in full} == {8}, 'a full batch leaves without waiting for the timeout'


async def test_with_several_processes_one_batch_is_filled_by_one_process(make_flow):
    flow = make_flow(FlowStep(Sleep(0.0), nprocs=2, batch_size=5, batch_timeout=0.5))
    tasks = [Task(i) for i in range(5)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    assert {t.batch for t in tasks} == {5}
    assert len({t.pid for t in tasks}) == 1


async def test_higher_priority_is_served_first(make_flow):
    flow = make_flow(FlowStep(Sleep(0.0)), queue_priorities=3)
    blocker = Task(0, sleep=0.3)
    running = asyncio.ensure_future(flow.process(blocker))
    await asyncio.sleep(0)  # one pass of the loop: the blocker goes to the idle worker
    low, high = Task(1), Task(2)
    low.set_priority(0)
    high.set_priority(2)
    calls = [asyncio.ensure_future(flow.process(low)), asyncio.ensure_future(flow.process(high))]
    await asyncio.gather(running, *calls)
    assert low.seen_so_far.index(2) < low.seen_so_far.index(1), 'high went before low'


async def test_a_priority_past_the_levels_is_served_at_the_highest_and_a_bad_one_is_refused(make_flow):
    flow = make_flow(Add(), queue_priorities=2)
    task = Task(1)
    task.set_priority(7)
    await flow.process(task)  # as in aqueduct 1.15: clamped, not refused
    assert (task.result, task.priority) == (2, 1)
    for bad in (-1, 1.5, '1', None):
        task = Task(1)
        task.priority = bad
        with pytest.raises(ValueError, match='priority'):
            await flow.process(task)


async def test_thousands_of_concurrent_calls_with_a_small_queue(make_flow):
    flow = make_flow(FlowStep(Add(), batch_size=4), Double(), queue_size=8)
    tasks = [Task(i) for i in range(3000)]
    await asyncio.gather(*(flow.process(t, timeout_sec=60) for t in tasks))
    assert [t.result for t in tasks] == [(i + 1) * 2 for i in range(3000)]


async def test_a_handler_error_is_both_a_flow_error_and_the_handlers_type(make_flow):
    flow = make_flow(Raise())
    with pytest.raises(ValueError, match='negative input -1') as info:
        await flow.process(Task(-1))
    err = info.value
    assert isinstance(err, FlowError) and isinstance(err, HandlerError)
    assert isinstance(err.__cause__, ValueError)
    assert 'Traceback' in str(err) and 'raise ValueError' in str(err)
    ok = Task(5)
    await flow.process(ok)
    assert ok.result == 5, 'the flow keeps serving'


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match='nprocs'):
        FlowStep(Add(), nprocs=0)
    with pytest.raises(ValueError, match='batch_size'):
        FlowStep(Add(), batch_size=0)
    with pytest.raises(ValueError, match='batch_timeout'):
        FlowStep(Add(), batch_timeout=-1)
    with pytest.raises(TypeError, match='BaseTaskHandler'):
        FlowStep(object())
    with pytest.raises(MPStartMethodValueError, match='mp_start_method'):
        Flow(Add(), mp_start_method='thread')
    with pytest.raises(ValueError, match='queue_priorities'):
        Flow(Add(), queue_priorities=0)
    with pytest.raises(ValueError, match='queue_size'):
        Flow(Add(), queue_size=0)


class LocalHandler(BaseTaskHandler):
    def handle(self, *tasks):
        pass


async def test_spawn_with_an_unpicklable_handler_fails_start_clearly():
    handler = LocalHandler()
    handler.lock = __import__('threading').Lock()  # locks cannot be pickled
    flow = Flow(handler, mp_start_method='spawn')
    with pytest.raises(FlowError, match='its handler cannot be pickled'):
        flow.start(timeout=30)
    assert children() == []


async def test_spawn_with_an_unpicklable_condition_fails_start_clearly():
    # The first step's condition runs in the caller; a later step's travels to the workers.
    flow = Flow(Add(), FlowStep(Add(), handle_condition=lambda task: True), mp_start_method='spawn')
    with pytest.raises(FlowError, match='cannot be pickled') as caught:
        flow.start(timeout=30)
    assert 'the handle_condition of step2_Add cannot be pickled' in str(caught.value)
    assert children() == []


async def test_forkserver_works(make_flow):
    flow = make_flow(Add(5), mp_start_method='forkserver')
    task = Task(1)
    await flow.process(task)
    assert task.result == 6


def test_base_task_api():
    t = Task(3)
    assert isinstance(t.task_id, str) and len(t.task_id) == 36
    assert t.task_id != Task(3).task_id
    assert t.priority == 0
    t.set_priority(2)
    assert t.priority == 2
    assert not t.is_expired()
    t.set_timeout(-1)
    assert t.is_expired()
    other = Task(9)
    other.result = 81
    other.extra = 'x'
    t.update(other)
    assert (t.x, t.result, t.extra) == (9, 81, 'x')
    assert t.task_id != other.task_id and t.priority == 2, 'bookkeeping fields are not copied'
    t.update(Task(1, result=5), excluded_fields={'result'})
    assert t.result == 81
    assert repr(t).startswith('<Task ') and 'result=81' in repr(t)
    assert pickle.loads(pickle.dumps(t)).__dict__ == t.__dict__


def test_task_ids_are_uuid4_strings_and_a_forked_child_makes_its_own():
    import uuid

    ids = {Task(i).task_id for i in range(2000)}  # past one buffer of random bytes
    assert len(ids) == 2000
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)
    # In a fresh interpreter: forking this one, with the suite's threads, would warn.
    script = (
        'import os\n'
        'from aqueduct import BaseTask\n'
        'ids = lambda: " ".join(BaseTask().task_id for _ in range(8))\n'
        'read, write = os.pipe()\n'
        'pid = os.fork()\n'
        'if pid == 0:\n'
        '    os.write(write, ids().encode())\n'
        '    os._exit(0)\n'
        'os.close(write)\n'
        'print(os.read(read, 4096).decode())\n'
        'print(ids())\n'
        'os.waitpid(pid, 0)\n'
    )
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60, check=True)
    child_ids, parent_ids = (set(line.split()) for line in out.stdout.splitlines())
    assert len(child_ids) == len(parent_ids) == 8
    assert not child_ids & parent_ids, 'a forked child made the ids its parent made'


class _Tagged:
    """A cooperative mixin with an ``__init__`` of its own, after ``BaseTask`` in the MRO."""

    def __init__(self, *args, tag='default', **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = tag


def test_base_task_init_calls_a_mixins_init_after_it_and_refuses_stray_arguments():
    class Tagged(BaseTask, _Tagged):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)

    assert Tagged().tag == 'default'
    assert Tagged(tag='x').tag == 'x'
    assert len(Tagged().task_id) == 36

    class Stray(BaseTask):
        def __init__(self):
            super().__init__(1)

    with pytest.raises(TypeError):  # object.__init__ takes no arguments, as in 1.15
        Stray()


def test_step_names():
    assert Add.get_step_name(1) == 'step1_Add'
    assert BaseTaskHandler.get_step_name(3) == 'step3_BaseTaskHandler'


@pytest.mark.parametrize('enabled', [False, True])
async def test_per_task_debug_lines_only_when_asked_for(enabled, tmp_path, monkeypatch):
    # The aqueduct logger is at DEBUG by default (as in 1.15), so the switch is its own.
    if enabled:
        monkeypatch.setenv('AQUEDUCT_LOG_TASKS', '1')
    lines = tmp_path / 'worker.log'
    handler = logging.FileHandler(lines)  # a forked worker inherits it
    log.addHandler(handler)
    flow = Flow(Add(), mp_start_method='fork')
    try:
        flow.start(timeout=30)
        task = Task(1)
        await flow.process(task)
        await flow.stop()
    finally:
        log.removeHandler(handler)
        handler.close()
    text = lines.read_text()
    # aqueduct 1.15's line, by handler class name.
    assert ('[Add] Have message\n' in text) is enabled
    assert ('[Add] Handled 1 task(s) in' in text and '(step1_Add)' in text) is enabled
    assert ('[Worker] initialising handler Add' in text) and ('[Worker] handler Add ok, starting loop' in text)


async def _until(condition, what: str, timeout: float = 20.0) -> None:
    """Waits, one loop pass at a time, until ``condition()`` holds (a bounded wait on the
    condition itself, not a guess at how long it takes)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f'timed out waiting for {what}'
        await asyncio.sleep(0.01)


@pytest.mark.parametrize('later_step_name', ['Double', 'Mark'])
async def test_a_task_expiring_in_one_step_is_logged_as_skipped_by_the_next(later_step_name, tmp_path, monkeypatch):
    """As in 1.15, whose worker of the next step read the expired task and skipped it: here the
    engine drops it before dispatch, and the line names the step it was going to."""
    monkeypatch.setenv('AQUEDUCT_LOG_TASKS', '1')
    lines = tmp_path / 'worker.log'
    handler = logging.FileHandler(lines)
    log.addHandler(handler)
    later = Double() if later_step_name == 'Double' else Mark('m')
    flow = Flow(Sleep(0.3), later, Add(), mp_start_method='fork')
    try:
        flow.start(timeout=30)
        with pytest.raises(TaskTimeoutError):
            await flow.process(Task(1), timeout_sec=0.1)
        skipped = f'[{later_step_name}] Task expired. Skip: <Task '
        await _until(lambda: skipped in lines.read_text(), 'the skip line')
        await flow.stop()
    finally:
        log.removeHandler(handler)
        handler.close()
    text = lines.read_text()
    assert '[Sleep] Have message' in text
    assert f'[{later_step_name}] Task expired. Skip: <Task ' in text
    assert '[Add] Have message' not in text and '[Add] Task expired' not in text


def test_logger_can_be_replaced():
    from aqueduct.logger import replace_logger

    saved = {k: getattr(log, k) for k in ('name', 'level', 'parent', 'propagate', 'handlers', 'disabled')}
    mine = logging.getLogger('my.app')
    try:
        replace_logger(mine)
        assert log.name == 'my.app' and log.handlers is mine.handlers
    finally:
        for k, v in saved.items():
            setattr(log, k, v)


def test_default_handle_condition_is_truth():
    assert FlowStep(Add()).handle_condition is operator.truth


def test_a_flow_survives_a_change_of_event_loop(start_method):
    """One ``asyncio.run`` after another, in other threads: each loop in turn serves the flow."""
    flow = Flow(Add(), mp_start_method=start_method)
    flow.start(timeout=30)
    try:
        tasks = [Task(1), Task(2)]
        for task in tasks:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                assert pool.submit(asyncio.run, flow.process(task)).result(timeout=30) is True
        again = Task(3)
        asyncio.run(flow.process(again))
        assert [t.result for t in (*tasks, again)] == [2, 3, 4]
    finally:
        asyncio.run(flow.stop())
    assert children() == []


async def test_a_call_from_another_thread_while_the_flows_loop_runs_gets_a_clear_error(make_flow):
    flow = make_flow(Add())
    await flow.process(Task(0))  # bound to this test's loop, which keeps running

    def in_new_loop():
        return asyncio.run(flow.process(Task(1)))

    with pytest.raises(FlowError, match='running in another thread.*run_coroutine_threadsafe'):
        await asyncio.get_running_loop().run_in_executor(None, in_new_loop)
    # The supported way from another thread, and the flow's own loop is unaffected.
    loop = asyncio.get_running_loop()
    task = Task(5)

    def threadsafe():
        return asyncio.run_coroutine_threadsafe(flow.process(task), loop).result(timeout=30)

    assert await loop.run_in_executor(None, threadsafe) is True
    assert task.result == 6


def test_many_threads_each_running_their_own_loop_never_hang():
    """16 threads, each ``asyncio.run(flow.process(...))`` at once: every call either completes or
    gets the clear error; none hangs past its timeout, and the flow keeps serving."""
    flow = Flow(FlowStep(Add(), nprocs=2))
    flow.start(timeout=30)
    try:
        barrier = threading.Barrier(16)

        def call(i: int):
            barrier.wait(timeout=30)
            task = Task(i)
            try:
                asyncio.run(flow.process(task, timeout_sec=10))
            except FlowError as exc:
                return exc
            return task.result

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(16), timeout=60))
        for i, result in enumerate(results):
            assert result == i + 1 or (isinstance(result, FlowError) and 'another thread' in str(result)), result
        ok = Task(100)
        asyncio.run(flow.process(ok))
        assert ok.result == 101
    finally:
        asyncio.run(flow.stop())
    assert children() == []


def test_seed_example_task_class_shape():
    class MyTask(BaseTask):
        def __init__(self, number: int):
            super().__init__()
            self.number = number
            self.result = None

    t = MyTask(4)
    assert t.number == 4 and t.result is None


async def test_the_event_loop_stays_responsive_while_a_handler_works(make_flow):
    flow = make_flow(Sleep(0.5))
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    running = asyncio.ensure_future(ticker())
    await flow.process(Task(1))
    running.cancel()
    # 0.5 s of handler time at one tick per 10 ms: up to 50 ticks; a loop blocked by the flow
    # would show at most one.
    assert ticks >= 10


async def test_completions_are_delivered_in_bulk(make_flow):
    flow = make_flow(FlowStep(Sleep(0.2), batch_size=8))
    deliveries = []

    class Recording:
        """The flow's driver, counting what each poll resolved."""

        def __init__(self, driver):
            self._driver = driver

        def __getattr__(self, name):
            return getattr(self._driver, name)

        def poll(self, events=True):
            resolved, worker_events = self._driver.poll(events)
            deliveries.append(resolved)
            return resolved, worker_events

        def poll_pass(self, events=False):
            resolved, worker_events, again = self._driver.poll_pass(events)
            deliveries.append(resolved)
            return resolved, worker_events, again

    flow._driver = Recording(flow._driver)
    tasks = [Task(i) for i in range(8)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    assert {t.batch for t in tasks[1:]} == {7}, 'the first went alone, the seven others as one batch'
    assert max(deliveries) == 7, f'one poll handed back the whole batch: {deliveries}'


async def test_a_task_that_expires_waiting_for_a_later_step_is_logged_as_skipped_by_it(tmp_path, monkeypatch):
    """The engine drops a task that expired in a later step's queue; the main process logs the
    skip, in 1.15's form, for that step."""
    monkeypatch.setenv('AQUEDUCT_LOG_TASKS', '1')
    lines = tmp_path / 'main.log'
    handler = logging.FileHandler(lines)
    log.addHandler(handler)
    flow = Flow(Mark('first'), Sleep(), mp_start_method='fork')
    try:
        flow.start(timeout=30)
        busy = asyncio.ensure_future(flow.process(Task(1, sleep=0.5)))
        await _until(lambda: flow.health()['steps'][1]['in_flight'] == 1, 'the second step to be busy')
        late = asyncio.ensure_future(flow.process(Task(2), timeout_sec=0.2))
        await _until(lambda: flow.health()['steps'][1]['queued'] == 1, 'the task queued for the second step')
        # The scenario, not a synchronisation: the loop is held past both the deadline and the
        # busy task's end, so that the engine, not the caller's timer, finds the task expired
        # when the second step's worker falls idle.
        time.sleep(0.6)
        await busy
        with pytest.raises(TaskTimeoutError):
            await late
        await flow.stop()
    finally:
        log.removeHandler(handler)
        handler.close()
    text = lines.read_text()
    assert '[Sleep] Task expired. Skip: dropped before dispatch to step2_Sleep' in text
    assert '[Mark] Task expired' not in text
