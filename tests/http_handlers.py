"""Handlers of the HTTP front's tests (importable by ``spawn`` workers and ``python -m aqueduct
serve``)."""

from __future__ import annotations

import hashlib
import math
import os
import select
import time

from aqueduct import BaseTaskHandler, Flow, FlowStep
from aqueduct.http import Request, sse


class Describe(BaseTaskHandler):
    """Answers with what it was sent; the path picks a kind of response."""

    def handle(self, *tasks: Request) -> None:
        for task in tasks:
            kind = task.path.rsplit('/', 1)[-1]
            if kind == 'raise':
                raise ValueError(f'cannot handle {task.body!r}')
            if kind == 'bytes':
                task.response = b'\x00raw'
            elif kind == 'text':
                task.response = 'h\u00e9llo'
            elif kind == 'none':
                task.status = 204
            elif kind == 'numpy':
                import numpy as np

                task.response = {'vector': np.arange(3, dtype=np.float32)}
            elif kind == 'created':
                task.status = 201
                task.response_headers = {'location': '/things/1', 'content-type': 'application/x-thing'}
                task.response = b'{}'
            elif kind == 'nan':
                task.response = {'x': math.nan}
            elif kind == 'status600':
                task.status = 600
            elif kind == 'statusbool':
                task.status = True
            elif kind == 'status101':
                task.status = 101
            elif kind == 'framing':
                task.response_headers = {'Content-Length': '2'}
                task.response = b'hello'
            elif kind == 'big':
                task.response = b'z' * (32 << 20)
            elif kind == 'crlf':
                task.response_headers = {'x-evil': 'a\r\nset-cookie: stolen=1'}
            elif kind == 'header_not_str':
                task.response_headers = {'x-count': 3}
            elif kind == 'object':
                task.response = {'x': object()}
            else:
                task.response = {
                    'method': task.method,
                    'path': task.path,
                    'query': task.query,
                    'headers': task.headers,
                    'body': task.body.decode('latin-1'),
                    'pid': os.getpid(),
                }


class Digest(BaseTaskHandler):
    """First of two steps: keeps the body's digest and size for the second."""

    def handle(self, *tasks: Request) -> None:
        for task in tasks:
            task.digest = hashlib.sha256(task.body).hexdigest()
            task.size = len(task.body)


class Report(BaseTaskHandler):
    """Second step: answers with what the first found (and which steps a task went through)."""

    def handle(self, *tasks: Request) -> None:
        for task in tasks:
            task.response = {'digest': getattr(task, 'digest', None), 'size': getattr(task, 'size', None)}


class Gate(BaseTaskHandler):
    """Holds every batch until the test releases it: writes its pid to the ``entered`` pipe,
    then waits (at most 20 s) for the ``release`` pipe to become readable, which it stays once
    the test wrote to it. Pipes, not ``multiprocessing.Event``: a worker SIGKILLed inside an
    Event's wait would leave the Event's lock held for ever."""

    def __init__(self, entered: int, release: int):
        self.entered = entered
        self.release = release

    def handle(self, *tasks: Request) -> None:
        os.write(self.entered, b'%d\n' % os.getpid())
        select.select([self.release], [], [], 20)
        for task in tasks:
            task.response = {'released': True}


class Stream(BaseTaskHandler):
    """Streams the response the request's JSON asks for: ``parts`` parts of ``kind`` (``sse``,
    ``json``, ``text``, ``bytes`` of ``size`` bytes), after setting ``status`` and ``headers``;
    raises after ``fail_after`` parts; waits ``delay`` seconds before it begins, and ``pause``
    seconds before each part after the first; ends with ``final`` as the response (with
    ``final_event``: ``sse(final, event=final_event)``). ``pid``: events carry the worker's pid.
    ``forever``: streams until its caller is gone, then writes ``gone <rounds of parts sent>``
    to the ``told`` pipe (given at construction)."""

    def __init__(self, told: int = -1):
        self.told = told

    def handle(self, *tasks: Request):
        asks = {id(task): task.json() for task in tasks}
        time.sleep(max(ask.get('delay', 0) for ask in asks.values()))
        for task in tasks:
            ask = asks[id(task)]
            task.status = ask.get('status', 200)
            task.response_headers = ask.get('headers', {})
        longest = max(ask.get('parts', 0) for ask in asks.values())
        forever = any(ask.get('forever') for ask in asks.values())
        n = 0
        try:
            while n < longest or forever:
                for task in tasks:
                    ask = asks[id(task)]
                    if not ask.get('forever') and n >= ask.get('parts', 0):
                        continue
                    if n == ask.get('fail_after'):
                        raise RuntimeError(f'failed after {n} parts')
                    if n and ask.get('pause'):
                        time.sleep(ask['pause'])
                    alive = yield task, self.part(ask, n)
                    if not alive and ask.get('forever'):
                        os.write(self.told, b'gone %d\n' % n)
                        return
                n += 1
        except GeneratorExit:  # every caller of the batch is gone: the runtime closed us
            os.write(self.told, b'gone %d\n' % n)
            raise
        for task in tasks:
            ask = asks[id(task)]
            if ask.get('final_event'):
                task.response = sse(ask.get('final', ''), event=ask['final_event'])
            else:
                task.response = ask.get('final')

    @staticmethod
    def part(ask: dict, n: int):
        kind = ask.get('kind', 'text')
        if kind == 'sse':
            data = {'n': n, 'pid': os.getpid()} if ask.get('pid') else {'n': n}
            return sse(data, event='token', id=str(n))
        if kind == 'json':
            return {'n': n}
        if kind == 'bytes':
            return bytes([n % 256]) * ask.get('size', 1)
        return f'part {n}\n'


def build_flow() -> Flow:
    """For ``python -m aqueduct serve tests.http_handlers:build_flow --http ...``."""
    return Flow(FlowStep(Describe(), nprocs=1))
