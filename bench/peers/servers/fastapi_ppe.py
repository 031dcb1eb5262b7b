"""The model (or the echo handler) behind FastAPI with a ``ProcessPoolExecutor(2)``: what a
service without a pipeline framework does. No batching: one request, one call in a worker.

    POST /embed {"text": ...} -> {"embedding": [384 floats]}
    POST /echo  {"text": ...} -> {"length": n}
    POST /image (1 MiB raw)    -> {"top5": [5 classes]}: two calls, each in a pool process
"""

from __future__ import annotations

import asyncio
import os
import sys
from concurrent.futures import ProcessPoolExecutor

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from pydantic import BaseModel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import Classifier, Embedder, echo, preprocess, server_args  # noqa: E402

_model: Embedder | None = None
_classifier: Classifier | None = None


def _load() -> None:
    global _model
    _model = Embedder()


def _embed(text: str) -> list:
    assert _model is not None, 'the worker loaded the model at start'
    return _model.embed([text])[0]


def _load_classifier() -> None:
    global _classifier
    _classifier = Classifier()


def _classify(pixels) -> list:
    assert _classifier is not None, 'the worker loaded the model at start'
    return _classifier.top5([pixels])[0]


def _echo(text: str) -> int:
    return echo([text])[0]


class Request(BaseModel):
    text: str


def create_image_app() -> FastAPI:
    pool = ProcessPoolExecutor(2, initializer=_load_classifier)
    app = FastAPI()

    @app.post('/image')
    async def serve(request: HttpRequest) -> dict:
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(pool, preprocess, await request.body())
        return {'top5': await loop.run_in_executor(pool, _classify, pixels)}

    return app


def create_app(handler: str) -> FastAPI:
    if handler == 'image':
        return create_image_app()
    pool = ProcessPoolExecutor(2, initializer=_load if handler == 'embed' else None)
    work, key = (_embed, 'embedding') if handler == 'embed' else (_echo, 'length')
    app = FastAPI()

    @app.post(f'/{handler}')
    async def serve(request: Request) -> dict:
        return {key: await asyncio.get_running_loop().run_in_executor(pool, work, request.text)}

    return app


def main() -> None:
    args = server_args()
    uvicorn.run(create_app(args.handler), host='127.0.0.1', port=args.port, log_level='warning')


if __name__ == '__main__':
    main()
