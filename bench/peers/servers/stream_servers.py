"""The streaming benchmark's handler on each framework: a request ``{"parts": n, "big": b}`` is
answered with ``n`` parts, each a short token (``big`` false) or the base64 text of a 1 MiB
array (``big`` true), sent as they are produced; 2 worker processes, batches of up to 16
collected for at most 5 ms.

    python stream_servers.py --framework ours|ours_http|mosec|litserve --port N

ours: aiohttp + ``Flow.stream``, Server-Sent Events; ours_http: the Rust HTTP front, Server-Sent
Events (``aqueduct.http.sse``); mosec: its ``SSEWorker``, Server-Sent
Events; LitServe: ``stream=True``, one JSON object per part. The handler code is the same
function everywhere (``parts_of``).
"""

from __future__ import annotations

import argparse
import base64

#: The big part: a 1 MiB float32 array as base64 text (what a text stream can carry).
BIG = base64.b64encode(bytes(1 << 20)).decode()


def parts_of(request: dict, i: int) -> str:
    return BIG if request['big'] else f'token {i}'


def ours(port: int) -> None:
    from stream_ours import serve

    serve(port)


def ours_http(port: int) -> None:
    from stream_ours_http import serve

    serve(port)


def mosec(port: int) -> None:
    from stream_mosec import serve

    serve(port)


def litserve(port: int) -> None:
    from stream_litserve import serve

    serve(port)


def main() -> None:
    parser = argparse.ArgumentParser()
    servers = {'ours': ours, 'ours_http': ours_http, 'mosec': mosec, 'litserve': litserve}
    parser.add_argument('--framework', choices=sorted(servers), required=True)
    parser.add_argument('--port', type=int, required=True)
    args = parser.parse_args()
    servers[args.framework](args.port)


if __name__ == '__main__':
    main()
