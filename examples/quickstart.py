"""The example of the aqueduct documentation (Fundamentals), made runnable.

A two-step pipeline: ``SumHandler`` adds with a "model" loaded in each worker by ``on_start``,
``SquareHandler`` squares the results in batches of up to 16 (whatever is queued when a worker
is free: ``batch_timeout=0``). Run with ``make demo``.
"""

import asyncio
import time
from typing import Optional

from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep


class MyModel:
    """This is an example of a CPU-bound model."""

    def process(self, number: int) -> int:
        return number + 1


class MyTask(BaseTask):
    number: int
    result: Optional[int]

    def __init__(self, number: int):
        super().__init__()
        self.number = number
        self.result = None


class SumHandler(BaseTaskHandler):
    def __init__(self):
        self._model = None

    def on_start(self):
        """Executed in a child process, so the parent process does not consume additional memory."""
        self._model = MyModel()

    def handle(self, *tasks: MyTask):
        for task in tasks:
            task.result = self._model.process(task.number)


class SquareHandler(BaseTaskHandler):
    def handle(self, *tasks: MyTask):
        for task in tasks:
            task.result = task.result**2


async def main() -> None:
    flow = Flow(
        FlowStep(SumHandler(), nprocs=2),
        FlowStep(SquareHandler(), batch_size=16),
    )
    started = time.perf_counter()
    flow.start(timeout=30)
    print(f'flow started in {(time.perf_counter() - started) * 1e3:.1f} ms')

    task = MyTask(41)
    await flow.process(task)
    print(f'MyTask(41) -> result {task.result}')

    n = 200
    t0 = time.perf_counter()
    for i in range(n):
        await flow.process(MyTask(i))
    sequential = (time.perf_counter() - t0) / n
    print(f'sequential: {sequential * 1e6:.0f} µs per task (one at a time, round trip through 2 steps)')

    tasks = [MyTask(i) for i in range(10_000)]
    t0 = time.perf_counter()
    await asyncio.gather(*(flow.process(t, timeout_sec=30) for t in tasks))
    elapsed = time.perf_counter() - t0
    assert all(t.result == (t.number + 1) ** 2 for t in tasks)
    print(f'concurrent: {len(tasks)} tasks in {elapsed:.2f} s, {elapsed / len(tasks) * 1e6:.1f} µs per task')
    print('first results:', [(t.number, t.result) for t in tasks[:5]])

    t0 = time.perf_counter()
    await flow.stop()
    print(f'flow stopped in {(time.perf_counter() - t0) * 1e3:.1f} ms')


if __name__ == '__main__':
    asyncio.run(main())
