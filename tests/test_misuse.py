"""Misuse gets a clear error, never corruption, a hang or a Rust panic: bad arguments, odd
tasks, a process forked after start()."""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from aqueduct import BaseTask, FlowStep, RestartPolicy, _core, shm
from aqueduct.exceptions import FlowError, TaskSerializationError

from .conftest import python_script
from .handlers import Add, SlotsAdd, SlotsTask, Task


@pytest.mark.parametrize('value', [math.nan, -1, -math.inf, 'soon', True, None])
def test_a_batch_timeout_that_is_not_a_number_of_seconds_is_refused_by_name(value):
    with pytest.raises(ValueError, match='batch_timeout'):
        FlowStep(Add(), batch_timeout=value)


@pytest.mark.parametrize('value', [math.nan, -1, 0, -math.inf, 'soon', True])
def test_a_handle_timeout_that_is_not_a_positive_number_of_seconds_is_refused_by_name(value):
    with pytest.raises(ValueError, match='handle_timeout'):
        FlowStep(Add(), handle_timeout=value)


@pytest.mark.parametrize('value', [math.inf, 1e20, 1e300])
async def test_a_huge_batch_timeout_means_wait_for_a_full_batch(make_flow, value):
    flow = make_flow(FlowStep(Add(), batch_size=2, batch_timeout=value))
    tasks = [Task(1), Task(2)]
    await asyncio.gather(*(flow.process(t, timeout_sec=20) for t in tasks))
    assert [t.batch for t in tasks] == [2, 2], 'the batch waited until it was full'


@pytest.mark.parametrize('value', [math.inf, 1e20, 1e300])
async def test_a_huge_timeout_means_no_limit(make_flow, value):
    flow = make_flow(Add())
    task = Task(1)
    assert await flow.process(task, timeout_sec=value) is True
    assert task.result == 2


@pytest.mark.parametrize('value', [math.nan, -math.inf, 0, -1, 'soon', True, None])
async def test_a_timeout_that_is_not_a_positive_number_of_seconds_is_refused_by_name(make_flow, value):
    flow = make_flow(Add())
    with pytest.raises(ValueError, match='timeout_sec'):
        await flow.process(Task(1), timeout_sec=value)
    ok = Task(1)
    await flow.process(ok)
    assert ok.result == 2


async def test_a_restart_window_of_nan_is_refused_and_one_of_inf_means_any_time(make_flow):
    for bad in (math.nan, -1.0, 0, 'a minute', True):
        with pytest.raises(ValueError, match='window'):
            RestartPolicy(window=bad)
    # Found in review: `inf` passed the policy's check and then failed `start()` ("too large").
    flow = make_flow(Add(), restart_policy=RestartPolicy(max_restarts=1, window=math.inf))
    ok = Task(1)
    await flow.process(ok)
    assert ok.result == 2


def test_no_rust_panic_reaches_python_from_the_engines_arguments():
    pool = shm.pool()
    for bad in (math.inf, math.nan, -1.0, 1e300):
        with pytest.raises(ValueError, match='batch_timeout'):
            _core.Driver([(1, 1, bad, 20, None)], pool, ['step1'])
        with pytest.raises(ValueError, match='handle_timeout'):
            _core.Driver([(1, 1, 0.0, 20, bad)], pool, ['step1'])
        with pytest.raises(ValueError, match='window'):
            _core.Driver([(1, 1, 0.0, 20, None)], pool, ['step1'], restart_window=bad)
    driver = _core.Driver([(1, 1, 0.0, 20, None)], pool, ['step1'])
    try:
        with pytest.raises(ValueError, match='timeout'):
            driver.wait(math.nan)
        assert driver.wait(-5.0) == (0, []), 'a deadline in the past is now'
        with pytest.raises(ValueError, match='grace'):
            driver.begin_stop(True, math.nan)
        with pytest.raises(IndexError):
            driver.worker(99)
    finally:
        driver.close()


@pytest.mark.parametrize('thing', [None, 42, 'task', object(), Task])
async def test_something_that_is_not_a_task_is_a_type_error_naming_it(make_flow, thing):
    flow = make_flow(Add())
    with pytest.raises(TypeError, match=f'BaseTask instance, got {type(thing).__name__}'):
        await flow.process(thing)
    assert flow.health()['steps'][0]['in_flight'] == 0, 'nothing was sent'


async def test_the_results_of_a_task_with_slots_are_applied(make_flow):
    flow = make_flow(SlotsAdd())
    task = SlotsTask(41)
    await flow.process(task)
    assert (task.result, task.secret) == (42, 'worker')


class Deep(BaseTask):
    def __init__(self):
        super().__init__()
        nested: list = []
        for _ in range(100_000):
            nested = [nested]
        self.nested = nested


class ReduceRaises(BaseTask):
    def __reduce__(self):
        raise ValueError('refuses to be pickled')


class StateRaises(BaseTask):
    def __getstate__(self):
        raise RuntimeError('no state today')


@pytest.mark.parametrize(
    'task, cause',
    [(Deep(), RecursionError), (ReduceRaises(), ValueError), (StateRaises(), RuntimeError)],
    ids=['recursion', 'reduce', 'getstate'],
)
async def test_any_failure_to_pickle_a_task_is_a_task_serialization_error(make_flow, task, cause):
    flow = make_flow(Add())
    with pytest.raises(TaskSerializationError, match=type(task).__name__) as info:
        await flow.process(task)
    assert isinstance(info.value.__cause__, cause)
    assert isinstance(info.value, FlowError) and isinstance(info.value, TypeError)
    ok = Task(1)
    await flow.process(ok)
    assert ok.result == 2


@pytest.mark.timeout(120)
def test_a_process_forked_after_start_gets_a_clear_error_and_the_parent_is_unaffected():
    script = '''
        import asyncio, os, sys
        os.dup2(1, 2)  # the log (stderr) goes to the captured output too
        from aqueduct import Flow, FlowStep
        from aqueduct.exceptions import FlowError
        from tests.handlers import Add, Task

        async def main():
            flow = Flow(FlowStep(Add(), nprocs=2))
            flow.start(timeout=30)
            await flow.process(Task(0))
            pid = os.fork()
            if pid == 0:
                code = 3
                try:
                    asyncio.run(flow.process(Task(1)))
                except FlowError as exc:
                    print('child:', exc, flush=True)
                    code = 0
                finally:
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            tasks = [Task(i) for i in range(200)]
            await asyncio.gather(*(flow.process(t, timeout_sec=20) for t in tasks))
            assert [t.result for t in tasks] == [i + 1 for i in range(200)]
            await flow.stop()
            print('parent: child exit', os.waitstatus_to_exitcode(status), 'owner', os.getpid(), flush=True)

        asyncio.run(main())
    '''
    with python_script(script) as proc:
        out, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, out
    child = next(line for line in out.splitlines() if line.startswith('child:'))
    parent = next(line for line in out.splitlines() if line.startswith('parent:'))
    owner = parent.split()[-1]
    assert f'belongs to process {owner}' in child and 'forked from it after start()' in child, child
    assert 'child exit 0' in parent
    assert 'protocol error' not in out and 'overruns' not in out


def test_a_flow_runs_under_valgrind():
    """Profiling with valgrind (callgrind gives `bench/` its instructions per task) must work:
    rustix's own vDSO lookup read past the vDSO valgrind maps and crashed the process, so the
    engine goes through libc for the clock; and valgrind 3.19 has no pidfd_open, so the engine
    watches the workers by polling there."""
    valgrind = shutil.which('valgrind')
    assert valgrind is not None, 'valgrind is part of every development machine of this project'
    code = textwrap.dedent(
        """
        import asyncio
        from aqueduct import Flow, FlowStep
        from tests.handlers import Add, Task

        async def main():
            flow = Flow(FlowStep(Add()))
            flow.start(timeout=120)
            task = Task(1)
            await flow.process(task, timeout_sec=120)
            await flow.stop()
            print('result', task.result)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [valgrind, '--tool=none', '--error-exitcode=3', sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.getcwd(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'result 2' in done.stdout


def test_calibrate_reports_the_hosts_costs_and_refuses_nonsense():
    """`python -m aqueduct calibrate`: the host's wake-up and spin costs as JSON, and a clear
    usage error (exit 2), not a traceback, for a number of rounds it cannot use."""
    done = subprocess.run(
        [sys.executable, '-m', 'aqueduct', 'calibrate', '--json', '--rounds', '20'],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    costs = json.loads(done.stdout)
    assert costs['cpus'] >= 1
    for key in ('wake_p50_us', 'wake_p99_us', 'spin_hop_p50_us', 'spin_hop_p99_us', 'spin_budget_us'):
        assert math.isfinite(costs[key]) and costs[key] >= 0, key
    assert costs['wake_p50_us'] <= costs['wake_p99_us']
    for rounds in ('3', '-1', 'many', '10000000'):
        bad = subprocess.run(
            [sys.executable, '-m', 'aqueduct', 'calibrate', '--rounds', rounds],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2, (rounds, bad.stderr)
        assert 'rounds' in bad.stderr and 'Traceback' not in bad.stderr, bad.stderr


@pytest.mark.parametrize(('rounds', 'processes'), [(5, 2), (-1, 2), (2**70, 2), (20, 0), (20, -3)])
def test_measure_host_refuses_out_of_range_arguments_by_name(rounds, processes):
    from aqueduct import calibrate

    with pytest.raises((ValueError, OverflowError), match='rounds|processes|int'):
        calibrate.measure(rounds, processes)
