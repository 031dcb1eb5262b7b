"""The flow both streaming examples serve: a stand-in for a text generator that emits one
token at a time (a real one would run a model's decode loop in ``handle``)."""

from __future__ import annotations

import hashlib
import time

from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep

#: Words the stand-in model draws from.
VOCABULARY = 'the of aqueduct carries water across a valley in stone arches for miles and years'.split()


class Prompt(BaseTask):
    def __init__(self, text: str, tokens: int):
        super().__init__()
        self.text = text
        self.tokens = tokens
        self.answer = ''


class Generator(BaseTaskHandler):
    """Yields ``(task, token)`` for every task of its batch, a token a step, as a model's decode
    loop does; ``closed`` counts generations stopped because their caller went away."""

    def __init__(self, seconds_per_token: float = 0.002):
        self.seconds_per_token = seconds_per_token
        self.closed = 0

    def handle(self, *tasks: Prompt):
        try:
            for step in range(max(t.tokens for t in tasks)):
                time.sleep(self.seconds_per_token)  # the model's work for one token of the batch
                for task in tasks:
                    if step < task.tokens:
                        token = next_token(task.text, step)
                        task.answer += token
                        yield task, token
        except GeneratorExit:
            self.closed += 1
            raise


class Report(BaseTaskHandler):
    pass


def next_token(prompt: str, step: int) -> str:
    digest = hashlib.sha256(f'{prompt}/{step}'.encode()).digest()
    return VOCABULARY[digest[0] % len(VOCABULARY)] + ' '


def build_flow() -> Flow:
    return Flow(FlowStep(Generator(), nprocs=2, batch_size=8, batch_timeout=0.005))
