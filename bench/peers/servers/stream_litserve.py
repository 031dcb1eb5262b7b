"""The streaming benchmark's server on LitServe: ``stream=True``, one JSON object per part (see
``stream_servers.py``)."""

from __future__ import annotations

import json
import os
import sys

import litserve as ls

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stream_servers import parts_of  # noqa: E402


class Emit(ls.LitAPI):
    def __init__(self) -> None:
        super().__init__(max_batch_size=16, batch_timeout=0.005, stream=True)

    def setup(self, device) -> None:
        pass

    def decode_request(self, request: dict) -> dict:
        return request

    def predict(self, requests: list):
        # LitServe streams a batch step by step: one list of parts (one per request) a step.
        for i in range(max(r['parts'] for r in requests)):
            yield [parts_of(r, i) if i < r['parts'] else None for r in requests]

    def encode_response(self, outputs):
        for step in outputs:
            yield [json.dumps({'part': p}) if p is not None else '' for p in step]


def serve(port: int) -> None:
    server = ls.LitServer(Emit(), accelerator='cpu', workers_per_device=2)
    server.run(host='127.0.0.1', port=port, generate_client_file=False, log_level='warning')
