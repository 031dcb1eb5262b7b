"""The token generator on the engine's own HTTP front (:mod:`aqueduct.http`): Rust threads
write each token as a Server-Sent Event as the worker sends it, with no Python in the main
process per token.

    POST /generate {"prompt": ..., "tokens": n}
        Server-Sent Events: one ``data:`` event per token (a JSON string, as the other examples
        send it), then ``event: done`` with the text
    POST /generate?format=text   the same tokens as a chunked plain-text body
    anything else -> 400 {"error": ...}

``make example-streaming-http`` serves on 127.0.0.1:8086, that is::

    python -m aqueduct serve front:build_flow --http 127.0.0.1:8086 --route /generate=0 --timeout 60

from this directory. Try ``curl -N -d '{"prompt": "hi", "tokens": 20}' 127.0.0.1:8086/generate``.
A client that hangs up mid-stream cancels its task: the generator in the worker is closed.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from app import prompt_of  # noqa: E402
from aqueduct import Flow, FlowStep  # noqa: E402
from aqueduct.http import Request, sse  # noqa: E402
from generate import Generator, Prompt  # noqa: E402


class GenerateEvents(Generator):
    """The generator of the other examples, its tokens sent as events of the request's response."""

    def handle(self, *tasks: Request):
        prompts = {}
        for task in tasks:
            try:
                prompts[id(task)] = prompt_of(json.loads(task.body))
            except ValueError as exc:  # JSON errors included
                task.status = 400
                task.response = {'error': str(exc)}
        streaming = [task for task in tasks if id(task) in prompts]
        if not streaming:
            return
        by_prompt = {id(prompts[id(task)]): task for task in streaming}
        for prompt, token in super().handle(*(prompts[id(task)] for task in streaming)):
            task = by_prompt[id(prompt)]
            # A str part is a chunk of text; an event makes the response an event stream.
            yield task, token if _as_text(task) else sse(json.dumps(token))
        for task in streaming:
            if not _as_text(task):
                task.response = sse(json.dumps(prompts[id(task)].answer), event='done')


def _as_text(task: Request) -> bool:
    return 'format=text' in task.query.split('&')


def build_flow() -> Flow:
    return Flow(FlowStep(GenerateEvents(), nprocs=2, batch_size=8, batch_timeout=0.005))


__all__ = ['GenerateEvents', 'Prompt', 'build_flow']
