"""A flow served over HTTP by the engine itself: the Rust HTTP front.

For a model server rather than a web app of your own::

    from aqueduct import Flow, FlowStep
    from aqueduct.http import HttpFront, Request

    class Embed(BaseTaskHandler):
        def handle(self, *tasks: Request):
            for task in tasks:
                task.response = {'vector': model(task.json()['text'])}

    flow = Flow(FlowStep(Embed(), nprocs=2, batch_size=16))
    flow.start()
    async with HttpFront(flow, port=8080, routes={'/embed': 0}):
        ...  # or `await aqueduct.http.serve(flow, ...)`, or
             # `python -m aqueduct serve pipeline:build_flow --http 127.0.0.1:8080 --route /embed=0`

HTTP is parsed, routed, limited and answered by Rust threads (hyper on tokio, in
``aqueduct._core.HttpServer``); a request's body goes into the flow's rings or pool as the state
of a :class:`Request` task without passing through Python in the main process, and the answer is
read back the same way. Only the handlers, in the workers, run Python: each route's step gets
:class:`Request` tasks (method, path, query, headers, body); the task leaves the flow with the
response its handlers set (``status``, ``response_headers``, ``response``), which the worker of
the last step encodes (:meth:`Request._final_state`: bytes as they are, a ``str`` as UTF-8,
anything else as JSON) before it travels back.

A route enters its step directly: the step's ``handle_condition`` is not consulted for requests
(it still routes tasks arriving from earlier steps, and later steps' conditions route requests
as usual).

Statuses the front gives itself, each with a JSON body ``{"error": ..., "message": ...}``:
404 (no route), 413 (body over ``max_body_bytes``), 408 (body not received by the deadline),
503 with ``Retry-After`` (``max_in_flight`` reached, a full queue under ``queue_full='reject'``,
the worker holding the request died, the shared-memory pool full, the flow stopping),
504 (the deadline passed in the flow, or the handler ran past ``handle_timeout``) and 500 (a
handler raised: its exception's type and message; or the response could not be encoded).
``/healthz`` and ``/metrics`` answer as the integrations' routes do (the same report, Prometheus
text with ``aqueduct-rs[prometheus]``), unless a route takes the path.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from . import _core
from .flow import Flow, FlowState, seconds_arg
from .logger import log
from .task import BaseTask

__all__ = ['HttpFront', 'Request', 'ServerSentEvent', 'serve', 'sse']

#: Defaults of :class:`HttpFront`.
DEFAULT_MAX_BODY = 16 << 20
DEFAULT_MAX_IN_FLIGHT = 1024
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_TIMEOUT = 5.0
DEFAULT_CLIENT_TIMEOUT = 10.0
DEFAULT_GRACE = 10.0

_NO_LIMIT = sys.maxsize


def _json_default(value: Any) -> Any:
    """numpy arrays and scalars (anything with ``tolist``) as JSON lists and numbers."""
    tolist = getattr(value, 'tolist', None)
    if tolist is None:
        raise TypeError(f'a response of type {type(value).__name__} is not JSON-serialisable')
    return tolist()


class Request(BaseTask):
    """One HTTP request, as the handlers of a route's steps see it.

    Request fields: ``method`` (``'POST'``), ``path`` (as sent, percent-encoded), ``query`` (the
    raw query string, ``''`` when none), ``headers`` (a dict of lower-case names; repeated
    fields joined with ``", "``) and ``body`` (``bytes``).

    Response fields, for the handlers to set: ``status`` (default 200; 200 to 599),
    ``response_headers`` (a dict; not the headers that frame the body, such as
    ``content-length``, which the front sets) and ``response``: ``bytes`` (sent as they are,
    ``application/octet-stream`` unless a ``content-type`` is set), ``str`` (UTF-8,
    ``text/plain``), ``None`` (an empty body), an event from :func:`sse` (``text/event-stream``),
    or anything ``json.dumps`` takes, numpy arrays included (``application/json``; NaN and
    infinities are refused, as JSON has none).

    Tasks can be made by hand too, to test handlers with ``await flow.process(Request(...))``:
    the caller's task then also gets ``reply_headers`` and ``reply_body``, the response exactly
    as the front would send it.
    """

    def __init__(
        self,
        body: bytes = b'',
        *,
        method: str = 'POST',
        path: str = '/',
        query: str = '',
        headers: Optional[Mapping[str, str]] = None,
    ) -> None:
        super().__init__()
        self.method = method
        self.path = path
        self.query = query
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.body = bytes(body)
        self.status = 200
        self.response_headers: Dict[str, str] = {}
        self.response: Any = None

    def json(self) -> Any:
        """The body parsed as JSON (``json.JSONDecodeError``, a ``ValueError``, if it is not)."""
        return json.loads(self.body)

    def text(self) -> str:
        """The body as UTF-8 text."""
        return self.body.decode('utf-8')

    def _final_state(self) -> bytes:
        """The state this task leaves the flow with, written by the last step's worker: the
        response only (``status``, ``reply_headers`` as pairs, ``reply_body`` as bytes), in the
        compact wire form the front reads without Python. Raises on a response it cannot send.
        After parts were sent (a streamed response), ``reply_body`` is the response's last chunk,
        encoded as a part is, with the status and headers that went out with the first part (for
        a ``flow.stream()`` caller's task; the front has sent them already)."""
        head = self.__dict__.get('_head_sent')
        if head:
            body = b'' if self.response is None else _joined(_chunk(self.response)[0])
            return self._wire_state({'status': head[0], 'reply_headers': head[1], 'reply_body': body})
        body, kind = _whole_body(self.response)
        return self._wire_state({'status': self.status, 'reply_headers': self._reply_headers(kind), 'reply_body': body})

    def _part_state(self, part: Any) -> bytes:
        """A part of a streamed response (see :func:`aqueduct.emit`) as the front reads it: one
        chunk of the body (``reply_body``); the first part also carries the status and headers,
        as the handler has set them by then. Raises on a part it cannot send."""
        chunk, kind = _chunk(part)
        state: Dict[str, Any] = {'reply_body': chunk}
        if not self.__dict__.get('_head_sent'):
            state['status'] = self.status
            state['reply_headers'] = self._reply_headers(kind, streamed=True)
            encoded = self._wire_state(state)
            # Set once the head is written; a later step that streams too sends chunks only.
            self._head_sent = (state['status'], state['reply_headers'])
            return encoded
        return self._wire_state(state)

    def _reply_headers(self, kind: Optional[str], streamed: bool = False) -> List[Tuple[str, str]]:
        """``response_headers`` as pairs, with ``content-type: kind`` unless one is set (and, for
        an event stream, ``cache-control: no-cache``: proxies must not hold events back)."""
        given = self.response_headers
        if not isinstance(given, Mapping):
            raise TypeError(f'response_headers must be a mapping, got {type(given).__name__}')
        headers: List[Tuple[str, str]] = []
        for name, value in given.items():
            if not isinstance(name, str) or not isinstance(value, str):
                raise TypeError(f'response header {name!r}: names and values must be str')
            headers.append((name, value))
        names = {name.lower() for name, _ in headers}
        if kind is not None and 'content-type' not in names:
            headers.append(('content-type', kind))
        if streamed and kind == _EVENT_STREAM and 'cache-control' not in names:
            headers.append(('cache-control', 'no-cache'))
        return headers

    def _wire_state(self, state: Dict[str, Any]) -> bytes:
        # The front checks the status (200 to 599) and the headers (valid HTTP, none that frames
        # the body) when it reads them.
        cls = type(self)
        encoded = _core.encode_state(cls.__module__, cls.__qualname__, state, _NO_LIMIT)
        if encoded is None:  # only str, int and bytes in there: cannot happen
            raise TypeError('the response could not be encoded')
        return encoded


_EVENT_STREAM = 'text/event-stream'


def _json_text(value: Any, what: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, separators=(',', ':'), default=_json_default)
    except ValueError as exc:  # NaN or an infinity
        raise ValueError(f'{what} is not valid JSON: {exc}') from None


def _whole_body(response: Any) -> Tuple[bytes, Optional[str]]:
    """A response as a body and its default content type."""
    if response is None:
        return b'', None
    if response.__class__ is ServerSentEvent:  # the last chunk of a stream that sent no part
        return bytes(response), _EVENT_STREAM
    if isinstance(response, (bytes, bytearray, memoryview)):
        return bytes(response), 'application/octet-stream'
    if isinstance(response, str):
        return response.encode('utf-8'), 'text/plain; charset=utf-8'
    return _json_text(response, 'the response').encode('utf-8'), 'application/json'


def _chunk(part: Any) -> Tuple[Any, str]:
    """A part as a chunk of a streamed body and the content type it implies: an event from
    :func:`sse` as it is (``text/event-stream``), ``bytes`` as they are, ``str`` as UTF-8, anything
    else as one line of JSON (``application/x-ndjson``). An event's chunk is a list of its pieces
    (``bytes`` and ``str``), which the front writes one after the other: its data is not copied
    into one buffer on the way."""
    if part.__class__ is ServerSentEvent:
        return list(part.pieces), _EVENT_STREAM
    if isinstance(part, (bytes, bytearray, memoryview)):
        return bytes(part), 'application/octet-stream'
    if isinstance(part, str):
        return part.encode('utf-8'), 'text/plain; charset=utf-8'
    return (_json_text(part, 'a part') + '\n').encode('utf-8'), 'application/x-ndjson'


def _joined(chunk: Any) -> bytes:
    """A chunk (see :func:`_chunk`) as one ``bytes``."""
    if chunk.__class__ is list:
        return b''.join(piece.encode('utf-8') if piece.__class__ is str else piece for piece in chunk)
    return chunk


class ServerSentEvent:
    """One Server-Sent Event, formatted (made by :func:`sse`; ``bytes(event)`` is what is sent):
    a part of a streamed response sent as it is, which makes the response ``text/event-stream``.
    Kept as its pieces, the fields up to ``data:`` and the data itself: an event may carry
    megabytes, which go into the part as they are."""

    __slots__ = ('pieces',)

    def __init__(self, head: bytes, data: str = '', tail: bytes = b''):
        self.pieces = (head, data, tail)

    def __bytes__(self) -> bytes:
        return _joined(list(self.pieces))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ServerSentEvent) and bytes(other) == bytes(self)

    def __hash__(self) -> int:
        return hash(bytes(self))

    def __reduce__(self):
        return ServerSentEvent, self.pieces

    def __repr__(self) -> str:
        return f'ServerSentEvent({bytes(self)!r:.120})'


#: What ends a line in an event stream: data is split on these, and no other field may hold one.
_LINE_BREAK = re.compile(r'[\r\n]')


def sse(
    data: Any, *, event: Optional[str] = None, id: Optional[str] = None, retry_ms: Optional[int] = None
) -> ServerSentEvent:
    """A Server-Sent Event for a handler to send as a part (``yield task, sse(token)``, or
    ``emit(task, sse(...))``): ``data`` is a ``str`` (split into ``data:`` lines at its line
    breaks, so that no text can end the event early) or anything JSON takes (one line of JSON);
    ``event`` names its type and ``id`` sets the client's last event id (neither may hold a line
    break, nor ``id`` a NUL); ``retry_ms`` sets the client's reconnection delay."""
    lines = []
    for name, value in (('event', event), ('id', id)):
        if value is None:
            continue
        if not isinstance(value, str):
            raise TypeError(f'sse(): {name} must be a str, got {type(value).__name__}')
        if _LINE_BREAK.search(value) or (name == 'id' and '\0' in value):
            raise ValueError(f'sse(): {name} must be one line of text, got {value!r:.80}')
        lines.append(f'{name}: {value}')
    if retry_ms is not None:
        if retry_ms.__class__ is bool or not isinstance(retry_ms, int) or retry_ms < 0:
            raise ValueError(f'sse(): retry_ms must be an int >= 0, got {retry_ms!r}')
        lines.append(f'retry: {int(retry_ms)}')
    # A str subclass as its plain text: the codec writes only exact str, and a `numpy.str_`
    # would be joined as the UCS-4 buffer it exposes.
    text = str.__str__(data) if isinstance(data, str) else _json_text(data, "an event's data")
    if '\r' in text:
        text = text.replace('\r\n', '\n').replace('\r', '\n')
    if '\n' in text:  # one data line per line of the text
        text = text.replace('\n', '\ndata: ')
    lines.append('data: ')
    return ServerSentEvent('\n'.join(lines).encode('utf-8'), text, b'\n\n')


def _side_report(flow: Flow, server: Optional[_core.HttpServer], kind: str) -> Tuple[int, str, bytes]:
    """``/healthz`` and ``/metrics`` of the front, as the integrations answer them."""
    from .integrations.utils import health_payload

    if kind == 'healthz':
        status, report = health_payload({'flow': flow})
        return status, 'application/json', json.dumps(report, default=str).encode()
    try:
        from prometheus_client import CollectorRegistry

        from .metrics.prometheus import CONTENT_TYPE_LATEST, FlowCollector, exposition
    except ImportError:
        message = b'/metrics needs prometheus-client: pip install aqueduct-rs[prometheus]\n'
        return 501, 'text/plain; charset=utf-8', message
    registry = CollectorRegistry()
    registry.register(FlowCollector(flow))
    registry.register(_ResponseCollector(server))
    return 200, CONTENT_TYPE_LATEST, exposition(registry)


class _ResponseCollector:
    """``aqueduct_http_responses_total{code}``: what the front answered."""

    def __init__(self, server):
        self._server = server

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily('aqueduct_http_responses', 'Responses of the HTTP front', labels=['code'])
        if self._server is not None:
            for code, count in sorted(self._server.responses().items()):
                family.add_metric([str(code)], count)
        yield family


Routes = Mapping[str, Union[int, str]]


class HttpFront:
    """Serves a running ``flow`` over HTTP on ``host:port`` (``port=0``: a free one, see
    :attr:`address`), from ``threads`` Rust threads of its own.

    ``routes`` maps a path to the step its requests enter (an index, or a step's name as in
    ``Flow`` metrics); default ``{'/': 0}``. ``timeout_sec`` is each request's deadline, from
    its headers to its answer (the last chunk of a streamed one); ``idle_timeout_sec``, if set,
    limits the wait for each part of a streamed response after its first (before it, the
    deadline only: a response that does not stream is not cut); ``client_timeout_sec`` bounds how
    long a client may take to send a request's headers, or to read what it is sent (a slow or
    idle client is disconnected). ``max_body_bytes``,
    ``max_in_flight`` (requests being served) and ``max_connections`` (open at once; more wait
    in the listen backlog) bound what clients can make the process hold.
    """

    def __init__(
        self,
        flow: Flow,
        host: str = '127.0.0.1',
        port: int = 8080,
        *,
        routes: Optional[Routes] = None,
        timeout_sec: float = DEFAULT_TIMEOUT,
        idle_timeout_sec: Optional[float] = None,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        client_timeout_sec: float = DEFAULT_CLIENT_TIMEOUT,
        threads: int = 1,
    ):
        if not isinstance(flow, Flow):
            raise TypeError(f'HttpFront serves a Flow, got {type(flow).__name__}')
        self._flow = flow
        self._host = host
        self._port = _int_arg('port', port, 0, 65535)
        self._routes = _route_table(flow, {'/': 0} if routes is None else routes)
        self._limits: Dict[str, Any] = dict(
            timeout=seconds_arg('timeout_sec', timeout_sec, positive=True),
            idle_timeout=seconds_arg('idle_timeout_sec', idle_timeout_sec, positive=True, none_ok=True),
            client_timeout=seconds_arg('client_timeout_sec', client_timeout_sec, positive=True),
            max_body=_int_arg('max_body_bytes', max_body_bytes, 0, _NO_LIMIT),
            max_in_flight=_int_arg('max_in_flight', max_in_flight, 1, _NO_LIMIT),
            max_connections=_int_arg('max_connections', max_connections, 1, 1 << 20),
            threads=_int_arg('threads', threads, 1, 256),
        )
        self._server: Optional[_core.HttpServer] = None

    @property
    def address(self) -> Tuple[str, int]:
        """``(host, port)`` the front listens on (once started)."""
        if self._server is None:
            raise RuntimeError('the front is not started')
        return self._server.address

    @property
    def url(self) -> str:
        host, port = self.address
        return f'http://{host}:{port}' if ':' not in host else f'http://[{host}]:{port}'

    def responses(self) -> Dict[int, int]:
        """Responses sent so far, by status code."""
        return self._server.responses() if self._server is not None else {}

    async def start(self) -> None:
        """Listens and serves; the flow must be running. From here on the front's own thread
        polls the flow's engine (the event loop only starts replacement workers and stops)."""
        if self._server is not None:
            raise RuntimeError('the front is already started')
        flow = self._flow
        if flow.state is not FlowState.RUNNING:
            raise RuntimeError('start the flow before its HTTP front')
        if flow._front is not None:
            raise RuntimeError('the flow is served by another HttpFront already')
        loop = asyncio.get_running_loop()
        if flow._loop is not loop:
            flow.attach(loop)
        holder: List[Optional[_core.HttpServer]] = [None]
        server = _core.HttpServer(
            flow._live(), self._host, self._port, self._routes, lambda kind: _side_report(flow, holder[0], kind),
            **self._limits,
        )  # fmt: skip
        holder[0] = server
        self._server = server
        flow._attach_front(server)
        log.info('HTTP front listening on %s (routes: %s)', self.url, ', '.join(p for p, _ in self._routes))

    async def stop(self, grace_sec: float = DEFAULT_GRACE) -> None:
        """Stops accepting connections, lets the requests under way finish for at most
        ``grace_sec`` seconds (their connections are closed after), and hands the polling of
        the flow back to its event loop. The flow keeps running: stop it after."""
        grace_sec = seconds_arg('grace_sec', grace_sec)
        server = self._server
        if server is None:
            return
        server.shutdown(grace_sec)
        loop = asyncio.get_running_loop()
        # The server's thread ends by itself at the end of the grace; joined off the loop, so
        # that the loop goes on starting replacements and serving callers meanwhile.
        while not await loop.run_in_executor(None, server.join, 0.5):
            pass
        self._flow._detach_front(server)
        self._server = None
        log.info('HTTP front stopped')

    async def __aenter__(self) -> HttpFront:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


def _set_once(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _int_arg(name: str, value: Any, lowest: int, highest: int) -> int:
    if value.__class__ is bool or not isinstance(value, int):
        raise TypeError(f'{name} must be an int, got {type(value).__name__}')
    if not lowest <= value <= highest:
        raise ValueError(f'{name} must be from {lowest} to {highest}, got {value}')
    return int(value)


def _route_table(flow: Flow, routes: Routes) -> List[Tuple[str, int]]:
    if not isinstance(routes, Mapping) or not routes:
        raise TypeError('routes must be a non-empty mapping of path to step')
    names = flow._step_names
    table = []
    for path, step in routes.items():
        if not isinstance(path, str) or not path.startswith('/'):
            raise ValueError(f"a route's path is a str starting with '/', got {path!r}")
        if isinstance(step, str):
            if step not in names:
                raise ValueError(f'route {path!r}: no step named {step!r} (steps: {", ".join(names)})')
            step = names.index(step)
        elif step.__class__ is bool or not isinstance(step, int) or not 0 <= step < len(names):
            raise ValueError(f'route {path!r}: the step is an index below {len(names)} or a name, got {step!r}')
        table.append((path, int(step)))
    return table


async def serve(
    flow: Flow,
    host: str = '127.0.0.1',
    port: int = 8080,
    *,
    grace_sec: float = DEFAULT_GRACE,
    started: Optional[asyncio.Future] = None,
    **options: Any,
) -> None:
    """Starts ``flow`` (if it is not running), serves it with an :class:`HttpFront` until
    SIGTERM or SIGINT, then drains (``grace_sec``) and stops both. ``started``, if given, is
    resolved with the front's address once it listens. ``options`` are :class:`HttpFront`'s."""
    loop = asyncio.get_running_loop()
    if flow.state is not FlowState.RUNNING:
        flow.start()
    stop = loop.create_future()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, _set_once, stop)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            pass
    front = None
    try:
        front = HttpFront(flow, host, port, **options)
        await front.start()
        if started is not None and not started.done():
            started.set_result(front.address)
        stopped = loop.create_task(flow.wait_stopped())
        await asyncio.wait([stop, stopped], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if front is not None:
            await front.stop(grace_sec)
        await flow.stop(grace_sec=grace_sec)
