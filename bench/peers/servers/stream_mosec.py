"""The streaming benchmark's server on mosec: its ``SSEWorker`` (see ``stream_servers.py``)."""

from __future__ import annotations

import os
import sys

from mosec import Server, SSEWorker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from stream_servers import parts_of  # noqa: E402


class Emit(SSEWorker):
    def forward(self, data: list) -> list:
        for i in range(max(d['parts'] for d in data)):
            for index, d in enumerate(data):
                if i < d['parts']:
                    self.send_stream_event(parts_of(d, i), index=index)
        return data


def serve(port: int) -> None:
    sys.argv = [sys.argv[0], '--address', '127.0.0.1', '--port', str(port), '--log-level', 'warning']
    server = Server()
    server.append_worker(Emit, num=2, max_batch_size=16, max_wait_time=5)
    server.run()
