"""The executor seam: steps whose slots are served by host code instead of worker processes.

``ThreadExecutor`` serves each slot from a thread of this process (the test suite's executor:
it proves the seam; a handler holding the GIL in a thread is not a production design). The flow
scenarios of ``test_flow`` that do not depend on worker *processes* (pids, start methods, a
handler that must not block the event loop's thread) run here again with every step on it, and
the faults the seam must survive are tested below.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading

import pytest
from aqueduct import Flow, FlowStep, RestartPolicy
from aqueduct._worker import serve
from aqueduct.exceptions import FlowError, WorkerDiedError
from aqueduct.executors import Executor, ExecutorWorker

from .conftest import children, finish_or_dump, flow_factory, python_script, without_start_method
from .handlers import Add, Double, Mark, Sleep, Task
from .test_flow import (  # noqa: F401 (collected here, with this module's make_flow)
    test_a_cancelled_call_raises_cancelled_error_and_its_task_is_dropped,
    test_a_handler_error_is_both_a_flow_error_and_the_handlers_type,
    test_a_priority_past_the_levels_is_served_at_the_highest_and_a_bad_one_is_refused,
    test_a_task_no_step_accepts_comes_back_unchanged,
    test_batch_size_is_an_upper_bound_and_timeout_zero_takes_what_is_queued,
    test_batch_timeout_fills_a_batch_from_the_first_task,
    test_completions_are_delivered_in_bulk,
    test_graceful_stop_finishes_tasks_in_flight,
    test_handle_condition_routes_tasks_past_steps,
    test_higher_priority_is_served_first,
    test_non_graceful_stop_fails_every_pending_call,
    test_on_start_failure_fails_start_with_the_cause_and_leaves_no_process,
    test_process_on_a_flow_that_is_not_running_raises,
    test_start_returns_after_every_on_start_finished,
    test_state_and_is_running,
    test_stop_twice_is_harmless,
    test_thousands_of_concurrent_calls_with_a_small_queue,
    test_timeout_raises_a_flow_error_that_mentions_it,
    test_with_several_processes_one_batch_is_filled_by_one_process,
)


class ThreadExecutor(Executor):
    """Serves each slot from a thread of this process, with its own copy of the handler (as a
    worker process has its own)."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.started = 0

    def start_worker(self, worker: ExecutorWorker) -> None:
        self.started += 1
        handler = copy.deepcopy(worker.handler)

        def run() -> None:
            try:
                serve(worker.endpoint, handler, worker.step_name, worker.routes)
            finally:
                worker.exited()

        thread = threading.Thread(target=run, name=f'{worker.step_name}-{worker.slot}', daemon=True)
        self.threads.append(thread)
        thread.start()


class CrashingOnce(ThreadExecutor):
    """Its first worker begins one batch and then dies without answering (a crash, as an
    executor sees a dead remote worker); the replacements serve normally."""

    def start_worker(self, worker: ExecutorWorker) -> None:
        if self.started:
            return super().start_worker(worker)
        self.started += 1
        self.crashing = threading.Event()

        def crash() -> None:
            worker.endpoint.ready()
            worker.endpoint.recv()  # begins the batch...
            self.crashing.wait(30)  # ...holds it until the test has queued more...
            worker.exited()  # ...and is gone

        thread = threading.Thread(target=crash, daemon=True)
        self.threads.append(thread)
        thread.start()


def on_threads(steps) -> list[FlowStep]:
    out = []
    for s in steps:
        step = s if isinstance(s, FlowStep) else FlowStep(s)
        step.executor = ThreadExecutor()
        out.append(step)
    return out


@pytest.fixture
async def make_flow():
    """``test_flow``'s factory, with every step served by a ``ThreadExecutor``; at teardown no
    process and no executor thread may remain."""
    flows: list[Flow] = []
    yield flow_factory(flows, lambda steps, kwargs: (on_threads(steps), without_start_method(kwargs)))
    for flow in flows:
        await flow.stop(graceful=False)
    for flow in flows:
        for step in flow.view.steps:
            for thread in step.executor.threads:
                # A thread cannot be killed: one in a handler ends when the handler returns.
                thread.join(30)
                assert not thread.is_alive(), 'an executor thread outlived its flow'
    assert children() == [], 'processes left behind'


async def test_an_executor_serves_a_step_next_to_process_steps():
    threads = ThreadExecutor()
    flow = Flow(FlowStep(Add(1)), FlowStep(Double(), executor=threads, nprocs=2), FlowStep(Mark('last')))
    flow.start(timeout=30)
    try:
        tasks = [Task(i) for i in range(50)]
        await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
        assert [t.result for t in tasks] == [(i + 1) * 2 for i in range(50)]
        assert {t.doubled_by for t in tasks} == {os.getpid()}, 'the middle step ran in this process'
        assert all(t.pid != os.getpid() and t.path == ('last',) for t in tasks), 'the others in workers'
        health = flow.health()['steps']
        assert [h['alive'] for h in health] == [1, 2, 1] and health[1]['ready'] == 2
        assert all(w.step != 1 for w in flow.view.workers()), 'executor slots have no process'
        assert threads.started == 2
    finally:
        await flow.stop()
    for thread in threads.threads:
        thread.join(10)
        assert not thread.is_alive()


async def test_a_dead_executor_worker_fails_what_it_began_and_hands_back_what_it_did_not():
    crashing = CrashingOnce()
    flow = Flow(FlowStep(Sleep(), executor=crashing), restart_policy=RestartPolicy(max_restarts=3))
    flow.start(timeout=30)
    try:
        begun = asyncio.ensure_future(flow.process(Task(1), timeout_sec=30))
        sent_ahead = asyncio.ensure_future(flow.process(Task(2), timeout_sec=30))
        await asyncio.sleep(0)  # one loop pass: both submitted (the second sent ahead)
        assert flow.health()['steps'][0]['in_flight'] == 2
        crashing.crashing.set()
        with pytest.raises(WorkerDiedError):
            await begun
        await sent_ahead  # never begun by the dead worker: run by its replacement
        step = flow.health()['steps'][0]
        assert step['deaths'] == 1 and step['restarts'] == 1, step
        after = Task(3)
        await flow.process(after)
        assert after.result == 3
    finally:
        await flow.stop()
    for thread in crashing.threads:
        thread.join(10)


def test_a_step_needs_an_executor_that_is_one_and_a_flow_with_one_is_not_handed_over():
    with pytest.raises(TypeError, match='executor must be an aqueduct.executors.Executor'):
        FlowStep(Add(), executor=object())
    with pytest.raises(FlowError, match='executor steps'):
        Flow(FlowStep(Add(), executor=ThreadExecutor())).init_processes()


def test_a_dead_executor_worker_next_to_forked_workers_does_not_block_the_loop():
    """An executor's worker has no pid: its exit must not make the fork launcher reap "pid 0"
    (any of its children, waiting until one exits) while the event loop waits for the answer."""
    with python_script(
        """
        import asyncio, faulthandler, signal
        from aqueduct import Flow, FlowStep, RestartPolicy
        from aqueduct.exceptions import WorkerDiedError
        from tests.handlers import Add, Sleep, Task
        from tests.test_executor import CrashingOnce
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
        async def main():
            crashing = CrashingOnce()
            steps = (FlowStep(Sleep(), executor=crashing), FlowStep(Add(1)))  # the second: a forked worker
            flow = Flow(*steps, mp_start_method='fork', restart_policy=RestartPolicy(max_restarts=3))
            flow.start(timeout=30)
            begun = asyncio.ensure_future(flow.process(Task(1), timeout_sec=30))
            await asyncio.sleep(0)  # one loop pass: submitted, and begun by the crashing worker
            crashing.crashing.set()
            try:
                await begun
            except WorkerDiedError:
                pass
            after = Task(2)
            await flow.process(after, timeout_sec=10)
            assert after.result == 3, after.result
            await flow.stop()
            print('done', flush=True)
        asyncio.run(main())
        """
    ) as proc:
        out = finish_or_dump(proc, 30, 'the event loop is blocked')
        assert out.strip().endswith('done')


def test_results_that_overflow_the_ring_do_not_deadlock_an_executor_thread():
    """An executor's worker in this process whose batch's results fill its ring waits for the
    engine to read them: it must not hold the GIL while it waits, the event loop's thread reads."""
    with python_script(
        """
        import asyncio, faulthandler, signal
        from aqueduct import BaseTaskHandler, Flow, FlowStep
        from tests.handlers import Task
        from tests.test_executor import ThreadExecutor
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if it hangs
        class Large(BaseTaskHandler):
            def handle(self, *tasks):
                for t in tasks:
                    t.result = 'x' * 60_000  # in the ring, not the pool: 32 of them overflow it
        async def main():
            flow = Flow(FlowStep(Large(), batch_size=32, batch_timeout=0.5, executor=ThreadExecutor()))
            flow.start(timeout=30)
            tasks = [Task(i) for i in range(32)]
            await asyncio.gather(*(flow.process(t, timeout_sec=20) for t in tasks))
            assert all(len(t.result) == 60_000 for t in tasks)
            await flow.stop()
            print('done', flush=True)
        asyncio.run(main())
        """
    ) as proc:
        out = finish_or_dump(proc, 30, 'deadlocked: the executor thread waits for ring space holding the GIL')
        assert out.strip().endswith('done')
