"""The model (or the echo handler) on mosec: its Rust HTTP front and batcher, two Python worker
processes, batches of up to 16 collected for at most 5 ms.

    POST /inference {"text": ...} -> {"embedding": [384 floats]} or {"length": n}
    POST /inference (1 MiB raw)  -> {"top5": [5 classes]}: two stages (2 + 2 workers)
"""

from __future__ import annotations

import os
import sys

from mosec import Server, Worker

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import Classifier, Embedder, echo, preprocess, server_args  # noqa: E402


class Embed(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = Embedder()

    def forward(self, data: list) -> list:
        return [{'embedding': v} for v in self.model.embed([d['text'] for d in data])]


class Echo(Worker):
    def forward(self, data: list) -> list:
        return [{'length': n} for n in echo([d['text'] for d in data])]


class DecodeImage(Worker):
    def deserialize(self, data: bytes) -> bytes:
        return data  # the raw upload, not JSON

    def forward(self, data: bytes):
        return preprocess(data)


class ClassifyImage(Worker):
    def __init__(self) -> None:
        super().__init__()
        self.model = Classifier()

    def forward(self, data: list) -> list:
        return [{'top5': top5} for top5 in self.model.top5(data)]


def main() -> None:
    args = server_args()
    # mosec reads its own options from the command line.
    sys.argv = [sys.argv[0], '--address', '127.0.0.1', '--port', str(args.port), '--log-level', 'warning']
    server = Server()
    if args.handler == 'image':
        server.append_worker(DecodeImage, num=2)
        server.append_worker(ClassifyImage, num=2, max_batch_size=16, max_wait_time=5)
    else:
        server.append_worker(Embed if args.handler == 'embed' else Echo, num=2, max_batch_size=16, max_wait_time=5)
    server.run()


if __name__ == '__main__':
    main()
