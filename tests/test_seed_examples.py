"""The examples of the documentation, pasted as a new user would, run unchanged.

The classes below are copied verbatim from the Fundamentals page of the aqueduct docs (only
``MyModel``, which the page leaves to the reader, is filled in).
"""

import asyncio
from typing import Optional

from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep


class MyModel:
    """This is an example of a CPU-bound model"""

    def process(self, number):
        return number * 10


# --- pasted from the documentation ------------------------------------------------------------


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
        self._model = MyModel()

    def handle(self, *tasks: MyTask):
        for task in tasks:
            task.result = self._model.process(task.number)


# ------------------------------------------------------------------------------------------------


async def test_the_documented_pipeline_runs(start_method):
    flow = Flow(FlowStep(SumHandler()), mp_start_method=start_method)
    flow.start()
    try:
        task = MyTask(4)
        await flow.process(task)
        assert task.result == 40
        tasks = [MyTask(i) for i in range(50)]
        await asyncio.gather(*(flow.process(t) for t in tasks))
        assert [t.result for t in tasks] == [i * 10 for i in range(50)]
    finally:
        await flow.stop()


async def test_a_bare_handler_is_a_step():
    flow = Flow(SumHandler())
    flow.start()
    try:
        task = MyTask(1)
        await flow.process(task)
        assert task.result == 10
    finally:
        await flow.stop()
