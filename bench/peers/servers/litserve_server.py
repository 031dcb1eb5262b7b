"""The model (or the echo handler) on LitServe: FastAPI/uvicorn in front, two worker processes
(``workers_per_device=2`` on the CPU), batches of up to 16 collected for at most 5 ms.

    POST /predict {"text": ...} -> {"embedding": [384 floats]} or {"length": n}
"""

from __future__ import annotations

import os
import sys

import litserve as ls

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import Embedder, echo, server_args  # noqa: E402


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


def main() -> None:
    args = server_args()
    server = ls.LitServer(TextAPI(args.handler), accelerator='cpu', workers_per_device=2)
    server.run(host='127.0.0.1', port=args.port, generate_client_file=False, log_level='warning')


if __name__ == '__main__':
    main()
