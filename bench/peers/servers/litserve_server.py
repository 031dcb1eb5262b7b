"""The model (or the echo handler) on LitServe: FastAPI/uvicorn in front, two worker processes
(``workers_per_device=2`` on the CPU), batches of up to 16 collected for at most 5 ms.

    POST /predict {"text": ...} -> {"embedding": [384 floats]} or {"length": n}
    POST /predict {"image": base64 of 1 MiB} -> {"top5": [5 classes]}

LitServe has one stage per API, and its default request type is JSON (or a form): the image
arrives base64-encoded in JSON, `decode_request` (in the worker) decodes and pools it, and
`predict` runs the batched classifier: both steps in each of the two workers.
"""

from __future__ import annotations

import base64
import os
import sys

import litserve as ls

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import Classifier, Embedder, echo, preprocess, server_args  # noqa: E402


class TextAPI(ls.LitAPI):
    def __init__(self, handler: str) -> None:
        super().__init__(max_batch_size=16, batch_timeout=0.005)
        self.handler = handler

    def setup(self, device) -> None:
        self.model = Embedder() if self.handler == 'embed' else None

    def decode_request(self, request: dict) -> str:
        return request['text']

    def predict(self, texts: list) -> list:
        return self.model.embed(texts) if self.model is not None else echo(texts)

    def encode_response(self, output) -> dict:
        return {'embedding': output} if self.handler == 'embed' else {'length': output}


class ImageAPI(ls.LitAPI):
    def __init__(self) -> None:
        super().__init__(max_batch_size=16, batch_timeout=0.005)

    def setup(self, device) -> None:
        self.model = Classifier()

    def decode_request(self, request: dict):
        return preprocess(base64.b64decode(request['image']))

    def predict(self, batch: list) -> list:
        return self.model.top5(batch)

    def encode_response(self, output) -> dict:
        return {'top5': output}


def main() -> None:
    args = server_args()
    api = ImageAPI() if args.handler == 'image' else TextAPI(args.handler)
    server = ls.LitServer(api, accelerator='cpu', workers_per_device=2)
    server.run(host='127.0.0.1', port=args.port, generate_client_file=False, log_level='warning')


if __name__ == '__main__':
    main()
