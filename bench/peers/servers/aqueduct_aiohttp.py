"""The model (or the echo handler) as an aiohttp service on an aqueduct flow: the same file runs
on aqueduct-rs and on aqueduct 1.15 (their public API is the same). Two worker processes, batches
of up to 16 collected for at most 5 ms.

    POST /embed {"text": ...} -> {"embedding": [384 floats]}
    POST /echo  {"text": ...} -> {"length": n}
    POST /image (1 MiB raw)    -> {"top5": [5 classes]}: two steps (2 + 2 processes)
"""

from __future__ import annotations

import asyncio
import os
import sys

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aqueduct import BaseTask, BaseTaskHandler, Flow, FlowStep  # noqa: E402
from aqueduct.integrations.aiohttp import AppIntegrator  # noqa: E402
from model import Classifier, Embedder, echo, preprocess, server_args  # noqa: E402


class TextTask(BaseTask):
    def __init__(self, text: str):
        super().__init__()
        self.text = text
        self.result = None


class EmbedHandler(BaseTaskHandler):
    def on_start(self) -> None:
        self.model = Embedder()  # in the worker, after it started

    def handle(self, *tasks: TextTask) -> None:
        for task, vector in zip(tasks, self.model.embed([t.text for t in tasks]), strict=True):
            task.result = vector


class EchoHandler(BaseTaskHandler):
    def handle(self, *tasks: TextTask) -> None:
        for task, length in zip(tasks, echo([t.text for t in tasks]), strict=True):
            task.result = length


class ImageTask(BaseTask):
    def __init__(self, image: bytes):
        super().__init__()
        self.image = image
        self.pixels = None
        self.top5 = None


class DecodeImage(BaseTaskHandler):
    def handle(self, *tasks: ImageTask) -> None:
        for task in tasks:
            task.pixels = preprocess(task.image)
            task.image = None  # not carried on


class ClassifyImage(BaseTaskHandler):
    def on_start(self) -> None:
        self.model = Classifier()

    def handle(self, *tasks: ImageTask) -> None:
        for task, top5 in zip(tasks, self.model.top5([t.pixels for t in tasks]), strict=True):
            task.top5 = top5
            task.pixels = None


def create_image_app() -> web.Application:
    async def serve(request: web.Request) -> web.Response:
        task = ImageTask(await request.read())
        await request.app['flow'].process(task, timeout_sec=30)
        return web.json_response({'top5': task.top5})

    app = web.Application(client_max_size=2 << 20)
    flow = Flow(
        FlowStep(DecodeImage(), nprocs=2),
        FlowStep(ClassifyImage(), nprocs=2, batch_size=16, batch_timeout=0.005),
    )
    AppIntegrator(app).add_flow(flow)
    app.router.add_post('/image', serve)
    return app


def create_app(handler: str) -> web.Application:
    if handler == 'image':
        return create_image_app()
    work = EmbedHandler() if handler == 'embed' else EchoHandler()
    step = FlowStep(work, nprocs=2, batch_size=16, batch_timeout=0.005)
    key = 'embedding' if handler == 'embed' else 'length'

    async def serve(request: web.Request) -> web.Response:
        body = await request.json()
        task = TextTask(body['text'])
        await request.app['flow'].process(task, timeout_sec=30)
        return web.json_response({key: task.result})

    app = web.Application()
    AppIntegrator(app).add_flow(Flow(step))
    app.router.add_post(f'/{handler}', serve)
    return app


def main() -> None:
    args = server_args()
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(create_app(args.handler), host='127.0.0.1', port=args.port, loop=loop, print=None)


if __name__ == '__main__':
    main()
