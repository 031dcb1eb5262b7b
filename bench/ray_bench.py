"""A step on Ray actors (``RayExecutor``) against the same step in local worker processes, Ray
Serve, aqueduct 1.15 and ``ProcessPoolExecutor``; and a step's throughput as its actors spread
over the nodes of a simulated cluster.

    python bench/peers/setup.py --only ray,aqueduct115   # the venvs (Ray Serve + our wheel; 1.15)
    python bench/ray_bench.py [--quick] [--runs N]       # writes bench/results/ray.json

Scenarios (each case in a fresh interpreter, ``--runs`` times, alternating the order; medians):

- ``cpu10ms``: a handler that burns 10 ms of CPU per task (a pure-Python loop, calibrated once
  on this host), two workers of one CPU each, batches of up to 8 gathered for at most 2 ms, 64
  tasks in flight from one asyncio client in the driver. Cases: ``local`` (aqueduct-rs, worker
  processes), ``ray_executor`` (aqueduct-rs, ``RayExecutor(num_cpus=1)``), ``serve`` (a Ray
  Serve deployment of 2 replicas of 1 CPU, ``@serve.batch(max_batch_size=8,
  batch_wait_timeout_s=0.002)``, called through its ``DeploymentHandle``), ``aqueduct115``
  (1.15, worker processes) and ``ppe`` (``ProcessPoolExecutor(2)``, one task per call).
  Throughput and each task's latency (p50, p99); the ideal is 2 CPUs / 10 ms = 200 tasks/s.
  ``ray_executor_x2``: the two actors with ``batches_per_actor=2`` (``nprocs=4``).
- ``scale``: a handler that sleeps 50 ms per task (batches of one), on a simulated cluster of
  four nodes of one CPU (``ray.cluster_utils.Cluster``), ``RayExecutor(num_cpus=1)`` with 1, 2
  and 4 actors, 64 in flight: throughput over the ideal (actors / 50 ms); ``scale4x2``: the 4
  actors with ``batches_per_actor=2``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from aqueduct import BaseTask, BaseTaskHandler

HERE = Path(__file__).resolve().parent
VENVS = HERE / 'peers' / '.venvs'
RESULTS = HERE / 'results' / 'ray.json'
IN_FLIGHT = 64
BATCH = 8
BATCH_TIMEOUT = 0.002


def burn(loops: int) -> int:
    """Pure-Python CPU work: ``loops`` iterations (calibrated to 10 ms)."""
    acc = 0
    for i in range(loops):
        acc += i * i
    return acc


def calibrate(seconds: float = 0.010) -> int:
    loops = 20_000
    while True:
        times = []
        for _ in range(7):
            started = time.perf_counter()
            burn(loops)
            times.append(time.perf_counter() - started)
        took = statistics.median(times)
        if took > 0.002:
            return int(loops * seconds / took)
        loops *= 4


def private_ray_dir() -> str:
    """Ray's session files, sockets and object store away from the machine's /tmp/ray and
    /dev/shm (a short path: unix socket names are limited)."""
    tmp = tempfile.mkdtemp(prefix='arb', dir='/tmp')
    os.environ['RAY_TMPDIR'] = tmp
    return tmp


async def load(submit, total: int) -> dict:
    """Keeps ``IN_FLIGHT`` calls of ``submit(i)`` going until ``total`` have finished (after a
    warm-up of ``IN_FLIGHT``); returns throughput and latency percentiles."""
    await asyncio.gather(*(submit(i) for i in range(IN_FLIGHT)))
    latencies: list = []
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < total:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            await submit(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(IN_FLIGHT)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        'tasks': len(latencies),
        'throughput': len(latencies) / elapsed,
        'p50_ms': latencies[len(latencies) // 2] * 1e3,
        'p99_ms': latencies[int(len(latencies) * 0.99)] * 1e3,
    }


# ------------------------------------------------------------------------------- the cases


class Job(BaseTask):
    def __init__(self, x: int) -> None:
        super().__init__()
        self.x = x
        self.result = None


class Work(BaseTaskHandler):
    """Burns ``loops`` iterations per task, or sleeps ``sleep`` seconds per task."""

    def __init__(self, loops: int, sleep: float = 0.0) -> None:
        self.loops = loops
        self.sleep = sleep

    def handle(self, *tasks) -> None:
        for t in tasks:
            if self.sleep:
                time.sleep(self.sleep)
            t.result = burn(self.loops) if self.loops else t.x


async def case_aqueduct(loops: int, total: int, executor, nprocs: int = 2) -> dict:
    from aqueduct import Flow, FlowStep

    kwargs = {'executor': executor} if executor is not None else {}
    flow = Flow(FlowStep(Work(loops), nprocs=nprocs, batch_size=BATCH, batch_timeout=BATCH_TIMEOUT, **kwargs))
    flow.start(timeout=300)
    try:

        async def submit(i: int) -> None:
            await flow.process(Job(i), timeout_sec=120)

        return await load(submit, total)
    finally:
        await flow.stop()


async def case_ray_executor(loops: int, total: int, batches_per_actor: int) -> dict:
    import ray
    from aqueduct.ray import RayExecutor

    tmp = private_ray_dir()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp, _plasma_directory=tmp)
    try:
        executor = RayExecutor(num_cpus=1, batches_per_actor=batches_per_actor)
        return await case_aqueduct(loops, total, executor, nprocs=2 * batches_per_actor)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


async def case_serve(loops: int, total: int) -> dict:
    import ray
    from ray import serve

    tmp = private_ray_dir()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp, _plasma_directory=tmp)

    @serve.deployment(num_replicas=2, ray_actor_options={'num_cpus': 1}, max_ongoing_requests=IN_FLIGHT)
    class Work:
        @serve.batch(max_batch_size=BATCH, batch_wait_timeout_s=BATCH_TIMEOUT)
        async def __call__(self, xs: list) -> list:
            return [burn(loops) for _ in xs]

    try:
        serve.start(proxy_location='Disabled')
        handle = serve.run(Work.bind(), name='bench', route_prefix=None)

        async def submit(i: int) -> None:
            await handle.remote(i)

        return await load(submit, total)
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


async def case_ppe(loops: int, total: int) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(2) as pool:

        async def submit(i: int) -> None:
            await loop.run_in_executor(pool, burn, loops)

        return await load(submit, total)


async def case_scale(actors: int, total: int, batches_per_actor: int) -> dict:
    import ray
    from aqueduct import Flow, FlowStep
    from aqueduct.ray import RayExecutor
    from ray.cluster_utils import Cluster

    tmp = private_ray_dir()
    store = {'object_store_memory': 128 * 2**20, 'plasma_directory': tmp}
    cluster = Cluster(initialize_head=True, head_node_args={'num_cpus': 0, 'include_dashboard': False, **store})
    for _ in range(4):
        cluster.add_node(num_cpus=1, **store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    executor = RayExecutor(num_cpus=1, batches_per_actor=batches_per_actor)
    flow = Flow(FlowStep(Work(0, sleep=0.05), nprocs=actors * batches_per_actor, executor=executor))
    try:
        flow.start(timeout=300)

        async def submit(i: int) -> None:
            await flow.process(Job(i), timeout_sec=120)

        result = await load(submit, total)
        result['ideal'] = actors / 0.05
        result['of_ideal'] = result['throughput'] / result['ideal']
        return result
    finally:
        await flow.stop()
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def run_case(name: str, loops: int, total: int) -> dict:
    if name == 'local' or name == 'aqueduct115':
        return asyncio.run(case_aqueduct(loops, total, None))
    if name.startswith('ray_executor'):
        return asyncio.run(case_ray_executor(loops, total, 2 if name.endswith('x2') else 1))
    if name == 'serve':
        return asyncio.run(case_serve(loops, total))
    if name == 'ppe':
        return asyncio.run(case_ppe(loops, total))
    if name.startswith('scale'):
        actors, _, per_actor = name[len('scale') :].partition('x')
        return asyncio.run(case_scale(int(actors), total, int(per_actor or 1)))
    raise SystemExit(f'unknown case {name}')


# ------------------------------------------------------------------------------- the driver

CPU_CASES = ['local', 'ray_executor', 'ray_executor_x2', 'serve', 'aqueduct115', 'ppe']
#: scale<actors>[x<batches per actor>]
SCALE_CASES = ['scale1', 'scale2', 'scale4', 'scale4x2']


def python_for(case: str) -> str:
    venv = 'aqueduct115' if case == 'aqueduct115' else 'ray'
    python = VENVS / venv / 'bin' / 'python'
    if not python.exists():
        raise SystemExit(f'{python} is missing: run python bench/peers/setup.py --only ray,aqueduct115')
    return str(python)


def spawn(case: str, loops: int, total: int) -> dict:
    script = str(Path(__file__).resolve())
    cmd = [python_for(case), script, '--case', case, '--loops', str(loops), '--total', str(total)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return {'error': 'timed out'}
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        return {'error': (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def median_of(runs: list) -> dict:
    good = [r for r in runs if 'error' not in r]
    if not good:
        return runs[-1]
    return {key: statistics.median(r[key] for r in good) for key in good[0]}


def host() -> dict:
    model = ''
    try:
        model = next(line.split(':', 1)[1].strip() for line in open('/proc/cpuinfo') if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    return {'cpu': model, 'cpus': os.cpu_count(), 'python': platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--case')
    parser.add_argument('--loops', type=int, default=0)
    parser.add_argument('--total', type=int, default=0)
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--runs', type=int, default=3)
    parser.add_argument('--only', help='comma-separated cases')
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.loops, args.total)), flush=True)
        return
    loops = calibrate()
    total = 400 if args.quick else 2000
    runs = 1 if args.quick else args.runs
    cases = args.only.split(',') if args.only else CPU_CASES + SCALE_CASES
    results: dict = {case: [] for case in cases}
    for run in range(runs):
        order = cases if run % 2 == 0 else list(reversed(cases))
        for case in order:
            outcome = spawn(case, loops, total if not case.startswith('scale') else total // 4)
            print(case, outcome, flush=True)
            results[case].append(outcome)
    summary = {case: median_of(r) for case, r in results.items()}
    out = {'host': host(), 'loops_for_10ms': loops, 'in_flight': IN_FLIGHT, 'runs': runs, 'cases': summary}
    # Against local worker processes run by run (the host's speed drifts between runs more than
    # the cases differ): the median of each run's ratio.
    for case, figures in summary.items():
        pairs = [
            mine['throughput'] / local['throughput']
            for mine, local in zip(results[case], results.get('local', []), strict=False)
            if 'throughput' in mine and 'throughput' in local
        ]
        if pairs and not case.startswith('scale'):
            figures['vs_local'] = statistics.median(pairs)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + '\n')
    print(json.dumps(out, indent=2))


if __name__ == '__main__':
    main()
