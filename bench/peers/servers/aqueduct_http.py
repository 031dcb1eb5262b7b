"""The model (or the echo handler) on aqueduct-rs's own HTTP front (`aqueduct.http`): Rust
threads parse and answer HTTP, two worker processes run the handler, batches of up to 16
collected for at most 5 ms. The workers parse the JSON body and encode the response.

    POST /embed {"text": ...} -> {"embedding": [384 floats]}
    POST /echo  {"text": ...} -> {"length": n}
    POST /image (1 MiB raw)    -> {"top5": [5 classes]}: two steps (2 + 2 processes)
"""

from __future__ import annotations

import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqueduct import BaseTaskHandler, Flow, FlowStep  # noqa: E402
from aqueduct.http import Request, serve  # noqa: E402
from model import Classifier, Embedder, echo, preprocess, server_args  # noqa: E402


class EmbedHandler(BaseTaskHandler):
    def on_start(self) -> None:
        self.model = Embedder()  # in the worker, after it started

    def handle(self, *tasks: Request) -> None:
        texts = [t.json()['text'] for t in tasks]
        for task, vector in zip(tasks, self.model.embed(texts), strict=True):
            task.response = {'embedding': vector}


class EchoHandler(BaseTaskHandler):
    def handle(self, *tasks: Request) -> None:
        for task, length in zip(tasks, echo([t.json()['text'] for t in tasks]), strict=True):
            task.response = {'length': length}


class DecodeImage(BaseTaskHandler):
    def handle(self, *tasks: Request) -> None:
        for task in tasks:
            task.pixels = preprocess(task.body)
            task.body = b''  # not carried on


class ClassifyImage(BaseTaskHandler):
    def on_start(self) -> None:
        self.model = Classifier()

    def handle(self, *tasks: Request) -> None:
        for task, top5 in zip(tasks, self.model.top5([t.pixels for t in tasks]), strict=True):
            task.response = {'top5': top5}


def main() -> None:
    args = server_args()
    if args.handler == 'image':
        flow = Flow(
            FlowStep(DecodeImage(), nprocs=2),
            FlowStep(ClassifyImage(), nprocs=2, batch_size=16, batch_timeout=0.005),
        )
    else:
        work = EmbedHandler() if args.handler == 'embed' else EchoHandler()
        flow = Flow(FlowStep(work, nprocs=2, batch_size=16, batch_timeout=0.005))
    routes = {f'/{args.handler}': 0}
    asyncio.run(serve(flow, '127.0.0.1', args.port, routes=routes, timeout_sec=30.0, max_body_bytes=2 << 20))


if __name__ == '__main__':
    main()
