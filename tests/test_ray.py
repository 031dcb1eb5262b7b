"""Steps served by Ray actors (``RayExecutor``), on a local Ray instance and a simulated cluster.

This process is a Ray driver for the module (one ``ray.init`` with two CPUs, its session files
and object store in a private directory): the scenarios of ``test_flow`` that do not depend on
worker *processes* run again with every step on Ray, then what is Ray's own: placement by
resources, arrays through the object store, an actor or a node that dies. A flow that starts Ray
itself, and a multi-node cluster, run in scripts of their own (one Ray instance per process).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
from aqueduct import Flow, FlowStep, RestartPolicy
from aqueduct.exceptions import FlowError, HandlerTimeoutError, WorkerDiedError, WorkerStartError
from aqueduct.ray import RayExecutor

from .conftest import finish_or_dump, flow_factory, python_script, until, without_start_method
from .handlers import Add, ArrayTask, Double, FailingStart, Mark, Raise, Sleep, SlotsAdd, SlotsTask, Task
from .ray_handlers import Busy, Emits, Flagged, InPlace, Layout, Quit, ReadOnly, ShareThere, Streams, not_skipped
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
    test_process_on_a_flow_that_is_not_running_raises,
    test_start_returns_after_every_on_start_finished,
    test_state_and_is_running,
    test_stop_twice_is_harmless,
    test_thousands_of_concurrent_calls_with_a_small_queue,
    test_timeout_raises_a_flow_error_that_mentions_it,
    test_with_several_processes_one_batch_is_filled_by_one_process,
)

ROOT = str(Path(__file__).resolve().parent.parent)
#: Actor processes take the title ``ray::<class>`` (``ray::IDLE`` when Ray pools them).
ACTOR_TITLE = 'ray::_RayWorker'

pytestmark = pytest.mark.timeout(120)


def ray_init_options(tmp: str) -> dict:
    """A private Ray instance: session files and sockets in ``tmp`` (a short path, for unix
    sockets), the object store a file there rather than in the machine's /dev/shm."""
    return {
        'num_cpus': 2,
        'include_dashboard': False,
        'log_to_driver': False,
        '_temp_dir': tmp,
        '_plasma_directory': tmp,
        'object_store_memory': 256 * 2**20,
    }


def print_leftovers() -> None:
    """For a script that ran its own Ray: prints the names of its descendants still alive once
    they have had 30 s to end (``left []``: none)."""
    _, alive = psutil.wait_procs(psutil.Process().children(recursive=True), timeout=30)
    print('left', [p.name() for p in alive], flush=True)


@pytest.fixture(scope='module', autouse=True)
def local_ray():
    tmp = tempfile.mkdtemp(prefix='ar', dir='/tmp')
    saved = {key: os.environ.get(key) for key in ('PYTHONPATH', 'RAY_TMPDIR')}
    os.environ['PYTHONPATH'] = ROOT  # Ray's workers import the tests' handlers by name
    os.environ['RAY_TMPDIR'] = tmp  # where Ray notes the current cluster, not the machine's /tmp/ray
    ray.init(**ray_init_options(tmp))
    ray_processes = {p.pid for p in psutil.Process().children(recursive=True)}
    yield ray_processes
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_leaked_fds():
    """Ray's client opens and pools connections of its own: of this process's descriptors only
    the flow's shared memory and process handles are checked."""

    def ours() -> set:
        found = set()
        for fd in os.listdir('/proc/self/fd'):
            try:
                target = os.readlink(f'/proc/self/fd/{fd}')
            except OSError:
                continue
            if target.startswith('/memfd:') or 'pidfd' in target:
                found.add(f'{fd} -> {target}')
        return found

    before = ours()
    yield
    assert ours() - before == set(), 'file descriptors leaked'


@pytest.fixture(autouse=True)
def children_outside_ray(monkeypatch, local_ray):
    """The reused scenarios' check for processes left behind looks outside Ray's own tree (an
    actor's process ends asynchronously after ``ray.kill``: the teardown waits for that)."""
    from . import test_flow

    monkeypatch.setattr(test_flow, 'children', lambda: flow_processes(local_ray))


def actor_processes() -> list:
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith(ACTOR_TITLE) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def flow_processes(ray_processes: set) -> list:
    """This process's live descendants outside Ray's own tree (the flow's worker processes)."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or proc.pid in ray_processes:
                continue
            if any(parent.pid in ray_processes for parent in proc.parents()):
                continue
            if 'resource_tracker' in ' '.join(proc.cmdline()) or 'forkserver' in ' '.join(proc.cmdline()):
                continue
            found.append(proc)
        except psutil.Error:
            pass
    return found


async def nothing_left(flows, ray_processes: set) -> None:
    """After ``stop()``: no actor of these flows, no actor process, no flow process."""
    for flow in flows:
        for step in flow.view.steps:
            if isinstance(step.executor, RayExecutor):
                assert step.executor.actors == [], 'an actor outlived its flow'
    # Ray ends a killed actor's process asynchronously: wait for that, boundedly.
    await until(lambda: actor_processes() == [], timeout=30)
    assert flow_processes(ray_processes) == [], 'worker processes left behind'


def on_ray(steps) -> list[FlowStep]:
    out = []
    for s in steps:
        step = s if isinstance(s, FlowStep) else FlowStep(s)
        # No CPU reserved: the reused scenarios place more actors than the two CPUs.
        step.executor = RayExecutor(num_cpus=0, start_timeout_sec=60)
        out.append(step)
    return out


@pytest.fixture
async def make_flow(local_ray):
    """``test_flow``'s factory, with every step served by Ray actors."""
    flows: list[Flow] = []
    yield flow_factory(flows, lambda steps, kwargs: (on_ray(steps), without_start_method(kwargs)), start_timeout=60)
    for flow in flows:
        await flow.stop(graceful=False)
    await nothing_left(flows, local_ray)


@pytest.fixture
async def flows(local_ray):
    """Flows a test builds itself: stopped, and checked gone, at teardown."""
    made: list[Flow] = []
    yield made
    for flow in made:
        await flow.stop(graceful=False)
    await nothing_left(made, local_ray)


def actor_pids(executor: RayExecutor) -> set:
    return {ray.get(actor.__ray_call__.remote(lambda self: os.getpid())) for actor in executor.actors}


# ------------------------------------------------------------------------------- the pipeline


async def test_a_ray_step_serves_between_process_steps(flows):
    on_ray = RayExecutor(num_cpus=1)
    flow = Flow(FlowStep(Add(1)), FlowStep(Double(), executor=on_ray, nprocs=2), FlowStep(Mark('last')))
    flows.append(flow)
    flow.start(timeout=60)
    tasks = [Task(i) for i in range(200)]
    await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    assert [t.result for t in tasks] == [(i + 1) * 2 for i in range(200)]
    assert all(t.path == ('last',) for t in tasks)
    actors = actor_pids(on_ray)
    assert len(actors) == 2 and {t.doubled_by for t in tasks} <= actors, 'doubled by the actors'
    assert {t.pid for t in tasks}.isdisjoint(actors) and os.getpid() not in actors
    health = flow.health()['steps']
    assert [h['alive'] for h in health] == [1, 2, 1] and health[1]['ready'] == 2
    assert ray.available_resources().get('CPU', 0) == 0, 'each actor holds the CPU it asked for'


async def test_the_documented_pipeline_runs_with_its_step_on_ray(flows):
    from .test_seed_examples import MyTask, SumHandler

    flow = Flow(FlowStep(SumHandler(), executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    task = MyTask(4)
    await flow.process(task)
    assert task.result == 40
    tasks = [MyTask(i) for i in range(50)]
    await asyncio.gather(*(flow.process(t) for t in tasks))
    assert [t.result for t in tasks] == [i * 10 for i in range(50)]


async def test_batches_are_formed_by_the_engine_and_handed_to_the_actor_whole(flows):
    flow = Flow(FlowStep(Busy(0.05), batch_size=8, batch_timeout=0.2, executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    tasks = [Task(i) for i in range(24)]
    await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    assert max(t.batch for t in tasks) == 8 and all(1 <= t.batch <= 8 for t in tasks)
    assert [t.result for t in tasks] == list(range(24))


async def test_a_deadline_that_passes_in_the_queue_fails_the_task_without_running_it(flows):
    flow = Flow(FlowStep(Sleep(), executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    blocker = asyncio.ensure_future(flow.process(Task(0, sleep=1.0), timeout_sec=30))
    await until(lambda: flow.health()['steps'][0]['in_flight'] == 1)
    late = Task(1)
    with pytest.raises(FlowError, match='[Tt]imeout'):
        await flow.process(late, timeout_sec=0.2)
    await blocker
    after = Task(2)
    await flow.process(after, timeout_sec=30)
    assert 1 not in after.seen_so_far, 'the expired task never reached the handler'


async def test_a_handler_exception_keeps_its_type_and_the_actor_serves_on(flows):
    flow = Flow(FlowStep(Raise(), executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    with pytest.raises(ValueError, match='negative input -3'):
        await flow.process(Task(-3))
    ok = Task(3)
    await flow.process(ok)
    assert ok.result == 3
    assert flow.health()['steps'][0]['deaths'] == 0


async def test_a_streaming_handler_is_refused_by_name(flows):
    flow = Flow(
        FlowStep(Streams(), executor=RayExecutor(), handle_condition=not_skipped),
        FlowStep(Emits(), executor=RayExecutor()),
    )
    flows.append(flow)
    flow.start(timeout=60)
    with pytest.raises(TypeError, match='streaming handle'):
        await flow.process(Task(1))
    with pytest.raises(TypeError, match='step2_Emits runs on a RayExecutor: its handler cannot stream'):
        await flow.process(Task(1, skip_first=True))


# ------------------------------------------------------------------------------- arrays


async def test_arrays_go_through_the_object_store_and_in_place_changes_come_back(flows):
    flow = Flow(FlowStep(InPlace(), executor=RayExecutor()), FlowStep(ReadOnly(), executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    big = np.arange(1_000_000, dtype=np.float64)  # 8 MB: over Ray's inline limit, in its store
    small = np.arange(10, dtype=np.int32)
    with_nan = np.array([math.nan, math.inf, -math.inf, 1.0])
    tasks = [ArrayTask(big.copy()), ArrayTask(small.copy()), ArrayTask(with_nan.copy())]
    await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    assert all(t.was_writable for t in tasks), 'the handler got a writable array, as in a worker'
    np.testing.assert_array_equal(tasks[0].arr, big * 2)
    np.testing.assert_array_equal(tasks[1].arr, small * 2)
    np.testing.assert_array_equal(tasks[2].arr, with_nan * 2)
    assert tasks[0].total == float((big * 2).sum())
    assert tasks[0].arr.flags.writeable, "the caller's array is its own"


async def test_a_shared_array_changed_in_place_stays_shared_and_a_new_one_can_be_shared(flows):
    flow = Flow(FlowStep(InPlace(), executor=RayExecutor()), FlowStep(ShareThere(), executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    task = ArrayTask(np.ones(200_000, dtype=np.float32), x=7)
    task.share_value('arr')
    view = task.arr
    await flow.process(task, timeout_sec=30)
    assert task.arr is view and float(view.sum()) == 400_000.0, 'written into the shared memory'
    assert set(task._shared_fields) == {'arr', 'out'}
    np.testing.assert_array_equal(task.out, np.full(50_000, 7, dtype=np.int64))


async def test_array_layout_aliasing_and_array_lookalikes_come_through_as_in_a_worker(flows):
    flow = Flow(FlowStep(Layout(), executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    arr = np.asfortranarray(np.arange(300_000, dtype=np.float64).reshape(600, 500))  # over the inline limit
    task = ArrayTask(arr, flagged=Flagged())
    task.same = task.arr
    await flow.process(task, timeout_sec=30)
    assert task.seen == (True, True, True), 'Fortran order, one array, writable'
    np.testing.assert_array_equal(task.arr, np.arange(300_000, dtype=np.float64).reshape(600, 500) * 2)
    assert task.flagged == Flagged()


async def test_a_task_with_slots_goes_whole_and_comes_back_whole(flows):
    flow = Flow(FlowStep(SlotsAdd(), executor=RayExecutor()))
    flows.append(flow)
    flow.start(timeout=60)
    task = SlotsTask(4)
    await flow.process(task, timeout_sec=30)
    assert task.result == 5 and task.secret == 'worker'


# ------------------------------------------------------------------------------- placement


async def test_an_actor_that_cannot_be_placed_fails_start_in_time_and_leaves_nothing(flows):
    executor = RayExecutor(resources={'no_such_node': 1}, start_timeout_sec=3)
    flow = Flow(FlowStep(Add(), executor=executor))
    flows.append(flow)
    started = time.monotonic()
    with pytest.raises(WorkerStartError, match='no_such_node'):
        flow.start(timeout=60)
    assert time.monotonic() - started < 30
    assert executor.actors == []


async def test_on_start_failure_fails_start_with_the_cause(flows):
    flow = Flow(FlowStep(Add(), executor=RayExecutor()), FlowStep(FailingStart(), executor=RayExecutor()))
    flows.append(flow)
    with pytest.raises(WorkerStartError, match='model file not found'):
        flow.start(timeout=60)


@pytest.mark.parametrize(
    ('kwargs', 'error', 'match'),
    [
        ({'num_cpus': math.nan}, ValueError, 'num_cpus'),
        ({'num_cpus': -1}, ValueError, 'num_cpus'),
        ({'num_gpus': math.inf}, ValueError, 'num_gpus'),
        ({'num_cpus': True}, ValueError, 'num_cpus'),
        ({'num_cpus': '1'}, ValueError, 'num_cpus'),
        ({'resources': {'CPU': 1}}, ValueError, 'custom resource'),
        ({'resources': {'gpu_node': math.nan}}, ValueError, 'gpu_node'),
        ({'resources': [('a', 1)]}, TypeError, 'mapping'),
        ({'address': 6379}, TypeError, 'address'),
        ({'memory': 0}, ValueError, 'memory'),
        ({'runtime_env': 'env'}, TypeError, 'runtime_env'),
        ({'start_timeout_sec': -1}, ValueError, 'start_timeout_sec'),
        ({'init_options': ['x']}, TypeError, 'init_options'),
        ({'batches_per_actor': 0}, ValueError, 'batches_per_actor'),
        ({'batches_per_actor': 1.5}, ValueError, 'batches_per_actor'),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, error, match):
    with pytest.raises(error, match=match):
        RayExecutor(**kwargs)


# ------------------------------------------------------------------------------- faults


async def test_a_killed_actor_fails_only_its_batch_and_a_new_actor_takes_its_place(flows):
    executor = RayExecutor()
    flow = Flow(FlowStep(Busy(), executor=executor), restart_policy=RestartPolicy(max_restarts=3))
    flows.append(flow)
    flow.start(timeout=60)
    held = asyncio.ensure_future(flow.process(Task(1, sleep=30), timeout_sec=60))
    await until(lambda: flow.health()['steps'][0]['in_flight'] == 1)
    queued = [asyncio.ensure_future(flow.process(Task(i), timeout_sec=60)) for i in range(2, 6)]
    [actor] = executor.actors
    ray.kill(actor, no_restart=True)
    with pytest.raises(WorkerDiedError):
        await held
    done = await asyncio.gather(*queued)
    assert len(done) == 4, 'the tasks queued behind it are served by the replacement'
    step = flow.health()['steps'][0]
    assert step['deaths'] == 1 and step['restarts'] == 1 and step['alive'] == 1, step
    assert len(executor.actors) == 1 and executor.actors[0] is not actor


async def test_an_actor_serving_two_slots_has_a_batch_queued_and_its_death_fails_both(flows):
    executor = RayExecutor(batches_per_actor=2)
    flow = Flow(FlowStep(Busy(), executor=executor, nprocs=2), restart_policy=RestartPolicy(max_restarts=4))
    flows.append(flow)
    flow.start(timeout=60)
    [actor] = executor.actors
    tasks = [Task(i, cpu=0.01) for i in range(40)]
    await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    assert len({t.pid for t in tasks}) == 1, 'one actor served both slots'
    held = [asyncio.ensure_future(flow.process(Task(i, sleep=30), timeout_sec=60)) for i in range(2)]
    await until(lambda: flow.health()['steps'][0]['in_flight'] == 2)
    queued = [asyncio.ensure_future(flow.process(Task(i), timeout_sec=60)) for i in range(4)]
    ray.kill(actor, no_restart=True)
    for call in held:  # one running in the actor, one queued there: the actor held both
        with pytest.raises(WorkerDiedError):
            await call
    assert await asyncio.gather(*queued) == [True] * 4
    step = flow.health()['steps'][0]
    assert step['deaths'] == 2 and step['ready'] == 2, step
    [replacement] = executor.actors
    assert replacement is not actor


async def test_a_handler_past_its_handle_timeout_has_its_actor_killed_and_replaced(flows):
    executor = RayExecutor()
    step = FlowStep(Busy(), executor=executor, handle_timeout=1.0)
    flow = Flow(step, restart_policy=RestartPolicy(max_restarts=3))
    flows.append(flow)
    flow.start(timeout=60)
    [hung] = executor.actors
    with pytest.raises(HandlerTimeoutError, match='handle_timeout of step1_Busy'):
        await flow.process(Task(1, sleep=60), timeout_sec=30)
    after = Task(2)
    await flow.process(after, timeout_sec=60)
    assert after.result == 2
    [replacement] = executor.actors
    assert replacement is not hung


async def test_sys_exit_in_a_handler_ends_its_actor_like_a_worker_process(flows):
    flow = Flow(FlowStep(Quit(), executor=RayExecutor()), restart_policy=RestartPolicy(max_restarts=3))
    flows.append(flow)
    flow.start(timeout=60)
    with pytest.raises(WorkerDiedError):
        await flow.process(Task(0), timeout_sec=30)
    after = Task(4)
    await flow.process(after, timeout_sec=60)
    assert after.result == 4


async def test_arguments_the_actor_cannot_import_fail_the_batch_and_the_actor_serves_on(flows, tmp_path):
    """A field whose class only this process can import (not the cluster's workers): Ray cannot
    deserialize the call there; that batch fails with the cause, the next one is served."""
    module = tmp_path / 'only_here.py'
    module.write_text('class Local:\n    pass\n')
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        import only_here

        flow = Flow(FlowStep(Add(), executor=RayExecutor()))
        flows.append(flow)
        flow.start(timeout=60)
        with pytest.raises(FlowError, match='Ray could not run the batch.*only_here'):
            await flow.process(Task(1, thing=only_here.Local()), timeout_sec=30)
        ok = Task(2)
        await flow.process(ok, timeout_sec=30)
        assert ok.result == 3 and flow.health()['steps'][0]['deaths'] == 0
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop('only_here', None)


# ------------------------------------------------------------------------------- Ray's lifetime


def test_a_flow_that_starts_ray_shuts_it_down_and_leaves_no_process():
    with python_script(
        f"""
        import asyncio, faulthandler, os, shutil, signal, sys, tempfile
        import ray
        sys.path.insert(0, {ROOT!r})
        os.environ['PYTHONPATH'] = {ROOT!r}
        from aqueduct import Flow, FlowStep
        from aqueduct.ray import RayExecutor
        from tests.handlers import Add, Task
        from tests.test_ray import print_leftovers, ray_init_options
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        tmp = os.environ['RAY_TMPDIR'] = tempfile.mkdtemp(prefix='ar', dir='/tmp')
        options = ray_init_options(tmp)
        async def main():
            assert not ray.is_initialized()
            flow = Flow(FlowStep(Add(), executor=RayExecutor(num_cpus=1, init_options=options), nprocs=2))
            flow.start(timeout=90)
            assert ray.is_initialized()
            tasks = [Task(i) for i in range(20)]
            await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
            assert [t.result for t in tasks] == list(range(1, 21))
            await flow.stop()
            assert not ray.is_initialized(), 'the executor that started Ray shut it down'
        asyncio.run(main())
        shutil.rmtree(tmp, ignore_errors=True)
        print_leftovers()
        """
    ) as proc:
        out = finish_or_dump(proc, 110, 'hung starting or stopping Ray')
        assert proc.returncode == 0
        assert out.strip().splitlines()[-1] == 'left []'


def test_on_a_cluster_a_lost_node_fails_only_its_batch_and_a_new_node_takes_the_slot():
    """Three simulated nodes: a head with no CPU for actors and two that take one actor each.
    One node is removed (its raylet and processes killed) under load: the one task its actor
    held fails with WorkerDiedError, every other is served by the other node; the replacement
    actor waits for resources, and comes up on a node added afterwards."""
    with python_script(
        f"""
        import asyncio, faulthandler, os, shutil, signal, sys, tempfile
        sys.path.insert(0, {ROOT!r})
        os.environ['PYTHONPATH'] = {ROOT!r}
        tmp = tempfile.mkdtemp(prefix='ar', dir='/tmp')
        os.environ['RAY_TMPDIR'] = tmp  # Ray's session files, and its note of the current cluster
        import ray
        from ray.cluster_utils import Cluster
        from aqueduct import Flow, FlowStep, RestartPolicy
        from aqueduct.exceptions import WorkerDiedError
        from aqueduct.ray import RayExecutor
        from tests.handlers import Task
        from tests.ray_handlers import Where
        from tests.test_ray import print_leftovers
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        store = {{'object_store_memory': 128 * 2**20, 'plasma_directory': tmp}}
        # A lost node is noticed after two seconds of missed heartbeats, not Ray's default 30.
        heartbeats = {{'health_check_period_ms': 500, 'health_check_failure_threshold': 4}}
        head = {{'num_cpus': 0, 'include_dashboard': False, '_system_config': heartbeats, **store}}
        cluster = Cluster(initialize_head=True, head_node_args=head)
        a = cluster.add_node(num_cpus=1, resources={{'worker_node': 1}}, **store)
        b = cluster.add_node(num_cpus=1, resources={{'worker_node': 1}}, **store)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)

        async def until(condition):
            for _ in range(600):
                if condition():
                    return
                await asyncio.sleep(0.1)
            raise AssertionError('condition not reached')

        async def main():
            executor = RayExecutor(num_cpus=1, resources={{'worker_node': 1}}, start_timeout_sec=60)
            step = FlowStep(Where(), executor=executor, nprocs=2)
            flow = Flow(step, restart_policy=RestartPolicy(max_restarts=5))
            flow.start(timeout=90)
            tasks = [Task(i, sleep=0.2) for i in range(40)]
            calls = [asyncio.ensure_future(flow.process(t, timeout_sec=90)) for t in tasks]
            await until(lambda: sum(hasattr(t, 'node') for t in tasks) >= 4)  # both nodes at work
            cluster.remove_node(b, allow_graceful=False)
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            failed = [type(o).__name__ for o in outcomes if isinstance(o, BaseException)]
            assert failed == ['WorkerDiedError'], failed
            served = {{t.node for t, o in zip(tasks, outcomes) if o is True}}
            assert served == {{a.node_id, b.node_id}}, served
            # A replacement Ray placed on the lost node before it was noticed lost dies too.
            health = flow.health()['steps'][0]
            assert health['deaths'] >= 1 and health['ready'] == 1, health
            c = cluster.add_node(num_cpus=1, resources={{'worker_node': 1}}, **store)
            await until(lambda: flow.health()['steps'][0]['ready'] == 2)
            more = [Task(i, sleep=0.2) for i in range(8)]
            await asyncio.gather(*(flow.process(t, timeout_sec=60) for t in more))
            assert {{t.node for t in more}} == {{a.node_id, c.node_id}}
            await flow.stop()
            assert executor.actors == []

        asyncio.run(main())
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
        print_leftovers()
        """
    ) as proc:
        out = finish_or_dump(proc, 110, 'hung on the simulated cluster')
        assert proc.returncode == 0
        assert out.strip().splitlines()[-1] == 'left []'


def test_a_cluster_that_goes_away_fails_calls_clearly_and_the_local_steps_serve_on():
    """Every node of the cluster, the head too, is killed under a held batch: that batch fails
    with WorkerDiedError, a call for the Ray step then times out, the local step keeps serving
    for longer than Ray's own limit for a driver without its head (60 s: the executor that
    connected raises it), and stop() returns."""
    with python_script(
        f"""
        import asyncio, faulthandler, os, shutil, signal, sys, tempfile, time
        sys.path.insert(0, {ROOT!r})
        os.environ['PYTHONPATH'] = {ROOT!r}
        tmp = tempfile.mkdtemp(prefix='ar', dir='/tmp')
        os.environ['RAY_TMPDIR'] = tmp
        from ray.cluster_utils import Cluster
        from aqueduct import Flow, FlowStep, RestartPolicy
        from aqueduct.exceptions import TaskTimeoutError, WorkerDiedError
        from aqueduct.ray import RayExecutor
        from tests.handlers import Add, Task
        from tests.ray_handlers import Where, on_ray
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        store = {{'object_store_memory': 128 * 2**20, 'plasma_directory': tmp}}
        cluster = Cluster(initialize_head=True, head_node_args={{'num_cpus': 0, 'include_dashboard': False, **store}})
        cluster.add_node(num_cpus=1, **store)
        cluster.wait_for_nodes()

        async def main():
            executor = RayExecutor(num_cpus=1, address=cluster.address, start_timeout_sec=30)
            # Replacements that cannot start are failures the policy counts: a budget that
            # outlasts the test (else the flow gives up, as for worker processes).
            policy = RestartPolicy(max_restarts=10, window=60)
            steps = FlowStep(Add(1)), FlowStep(Where(), executor=executor, handle_condition=on_ray)
            flow = Flow(*steps, restart_policy=policy)
            flow.start(timeout=90)
            held = asyncio.ensure_future(flow.process(Task(1, sleep=30), timeout_sec=60))
            while flow.health()['steps'][1]['in_flight'] == 0:
                await asyncio.sleep(0.05)
            for node in list(cluster.worker_nodes):
                cluster.remove_node(node, allow_graceful=False)
            cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
            killed = time.monotonic()
            try:
                await held
                raise AssertionError('the held batch finished without its cluster')
            except WorkerDiedError:
                pass
            try:
                await flow.process(Task(2), timeout_sec=3)
                raise AssertionError('served without a cluster')
            except TaskTimeoutError:
                pass
            while time.monotonic() - killed < 75:
                local = Task(3, local_only=True)
                await flow.process(local, timeout_sec=5)
                assert local.result == 4
                await asyncio.sleep(1)
            started = time.monotonic()
            await flow.stop()
            print('stopped in', round(time.monotonic() - started, 1), flush=True)

        asyncio.run(main())
        shutil.rmtree(tmp, ignore_errors=True)
        print('alive', flush=True)
        """
    ) as proc:
        out = finish_or_dump(proc, 140, 'hung once the cluster was gone')
        assert proc.returncode == 0, out
        lines = out.strip().splitlines()
        assert lines[-1] == 'alive'
        assert float(lines[-2].split()[-1]) < 20, lines[-2]
