"""The model (or the echo handler) on Ray Serve: a local Ray instance of 2 CPUs, its HTTP proxy
in front, a deployment of 2 replicas of 1 CPU each, ``@serve.batch`` of up to 16 for at most 5 ms.

    POST / {"text": ...} -> {"embedding": [384 floats]} or {"length": n}
    POST / (1 MiB raw)    -> {"top5": [5 classes]}: an ingress deployment composing two
                             deployments (pooling, then the batched classifier), 2 replicas
                             of half a CPU each
"""

from __future__ import annotations

import os
import signal
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)

import ray  # noqa: E402
from model import server_args  # noqa: E402
from ray import serve  # noqa: E402
from starlette.requests import Request  # noqa: E402


@serve.deployment(num_replicas=2, ray_actor_options={'num_cpus': 1})
class Text:
    def __init__(self, handler: str) -> None:
        from model import Embedder

        self.handler = handler
        self.model = Embedder() if handler == 'embed' else None

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def run(self, texts: list) -> list:
        from model import echo

        return self.model.embed(texts) if self.model is not None else echo(texts)

    async def __call__(self, request: Request) -> dict:
        out = await self.run((await request.json())['text'])
        return {'embedding': out} if self.handler == 'embed' else {'length': out}


@serve.deployment(num_replicas=2, ray_actor_options={'num_cpus': 0.5})
class Preprocess:
    def __call__(self, data: bytes):
        from model import preprocess

        return preprocess(data)


@serve.deployment(num_replicas=2, ray_actor_options={'num_cpus': 0.5})
class Classify:
    def __init__(self) -> None:
        from model import Classifier

        self.model = Classifier()

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def __call__(self, batch: list) -> list:
        return self.model.top5(batch)


@serve.deployment(ray_actor_options={'num_cpus': 0})
class Image:
    def __init__(self, preprocess, classify) -> None:
        self.preprocess, self.classify = preprocess, classify

    async def __call__(self, request: Request) -> dict:
        pixels = await self.preprocess.remote(await request.body())
        return {'top5': await self.classify.remote(pixels)}


def main() -> None:
    args = server_args()
    # The replicas import `model` from this directory.
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={'env_vars': {'PYTHONPATH': HERE}})
    serve.start(http_options={'host': '127.0.0.1', 'port': args.port})
    if args.handler == 'image':
        app = Image.bind(Preprocess.bind(), Classify.bind())
    else:
        app = Text.bind(args.handler)
    serve.run(app, route_prefix='/')
    # SIGTERM only ends the pause: the local Ray instance is then shut down, with its processes.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.pause()
    serve.shutdown()
    ray.shutdown()


if __name__ == '__main__':
    main()
