"""FastAPI and Starlette integration.

    app = FastAPI()
    AppIntegrator(app).add_flow(build_flow())     # workers start now, before the server forks

    @app.post('/process')
    async def process(flow: Flow = Depends(get_flow())):
        ...

or, for any ASGI app with a lifespan, ``lifespan=flow_lifespan(flow)``. Flows are attached to the
server's event loop when it starts and stopped when it shuts down; with ``exit_on_fail`` the
server stops (SIGTERM to itself) if a flow stops for good.

``await share_request_body(task, 'image', request)`` reads an upload straight into shared memory.
Starlette has no body size limit of its own, so this one applies: ``AppIntegrator(app,
client_max_size=...)``, or per call, else 1 MiB (aiohttp's default). :func:`error_response`
answers the errors of doing so (413, 411, 408, 400, and 503 with ``Retry-After`` for a full pool).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator, Callable, Dict, List, Optional

from ..exceptions import PayloadLengthError
from ..flow import Flow
from ..logger import replace_logger
from ..task import BaseTask
from . import utils
from .utils import PAYLOAD_ERRORS, exit_when_stopped, get_start_timeout, health_payload  # noqa: F401 - API

FLOW_NAME = 'flow'
#: Where the names of the flows added are listed (``app.state``), as in 1.15.
AQUEDUCT_FLOW_NAMES = 'aqueduct_flow_names'
#: Where ``AppIntegrator(client_max_size=)`` keeps the app's body size limit (``app.state``).
CLIENT_MAX_SIZE = 'aqueduct_client_max_size'


def get_flow(flow_name: str = FLOW_NAME) -> Callable:
    """A FastAPI dependency resolving the flow added under ``flow_name``."""

    from starlette.requests import Request

    def _get_flow(request) -> Flow:
        return getattr(request.app.state, flow_name)

    # FastAPI injects by annotation; this module's annotations are strings it cannot resolve.
    _get_flow.__annotations__ = {'request': Request, 'return': Flow}
    return _get_flow


def flow_lifespan(*flows: Flow, exit_on_fail: bool = True, start_timeout: Optional[float] = None):
    """A lifespan for Starlette/FastAPI: starts ``flows`` that are not running yet, attaches
    them to the server's loop, and stops them at shutdown. A ``SocketFlow`` (a flow shared by
    several web processes) is attached to its flow server at startup and detached at shutdown.
    """

    @asynccontextmanager
    async def lifespan(app) -> AsyncIterator[None]:
        async with _running({f'flow{i}': f for i, f in enumerate(flows)}, exit_on_fail, start_timeout):
            yield

    return lifespan


async def observe_flows(flows: Dict[str, Flow], check_interval: float = 1.0) -> None:
    """Stops this server process (SIGTERM to itself) once one of ``flows`` (name -> flow) has
    stopped for good, as 1.15's did; for lifespans written by hand. The flows are watched rather
    than polled: ``check_interval`` (1.15's polling period) is accepted and unused."""
    await exit_when_stopped(flows)


@asynccontextmanager
async def _running(flows: Dict[str, Flow], exit_on_fail: bool, start_timeout: Optional[float]):
    from ..sockets import SocketFlow

    for flow in flows.values():
        if isinstance(flow, SocketFlow):  # a flow shared with other web processes
            await flow.start()
            continue
        if not flow.is_running and not flow.are_steps_initialized:
            flow.start(timeout=start_timeout if start_timeout is not None else get_start_timeout())
        if flow.are_steps_initialized:
            flow.start_inited()
        flow.attach()
    observer = asyncio.ensure_future(observe_flows(flows)) if exit_on_fail else None
    try:
        yield
    finally:
        if observer is not None:
            observer.cancel()
        for flow in flows.values():
            await flow.stop()


class AppIntegrator:
    """Adds flows to a FastAPI (or Starlette) app, as in aqueduct 1.15. Wraps the app's
    lifespan; add flows before the server starts. ``client_max_size`` limits the request bodies
    :func:`share_request_body` reads (bytes; 0: no limit but the pool's), as aiohttp's does."""

    def __init__(
        self,
        app,
        exit_on_fail: bool = True,
        logger: Optional[logging.Logger] = None,
        metrics_path: Optional[str] = None,
        health_path: Optional[str] = None,
        client_max_size: int = utils.MAX_BODY_SIZE_DEFAULT,
    ) -> None:
        if hasattr(app.state, AQUEDUCT_FLOW_NAMES):
            raise RuntimeError('AppIntegrator can be created only once. Reuse existing AppIntegrator.')
        self._app = app
        # Read by share_request_body: the body size limit aiohttp apps set the same way.
        setattr(app.state, CLIENT_MAX_SIZE, client_max_size)
        self._names: List[str] = []
        setattr(app.state, AQUEDUCT_FLOW_NAMES, self._names)
        self._started = False
        self._exit_on_fail = exit_on_fail
        if logger is not None:
            replace_logger(logger)
        user_lifespan = app.router.lifespan_context
        integrator = self

        @asynccontextmanager
        async def lifespan(app) -> AsyncIterator:
            integrator._started = True
            async with _running(integrator._flows(), integrator._exit_on_fail, None):
                async with user_lifespan(app) as state:
                    yield state

        app.router.lifespan_context = lifespan
        if metrics_path is not None:
            from prometheus_client import CollectorRegistry

            from ..metrics.prometheus import FlowCollector, asgi_app

            registry = CollectorRegistry()
            registry.register(FlowCollector(_LiveFlows(self)))
            app.mount(metrics_path, asgi_app(registry))
        if health_path is not None:
            from starlette.responses import JSONResponse

            async def health(request):
                status, body = health_payload(self._flows())
                return JSONResponse(body, status_code=status)

            app.add_route(health_path, health, methods=['GET'])

    def add_flow(self, flow: Flow, flow_name: str = FLOW_NAME, with_start: bool = True) -> None:
        if self._started:
            raise RuntimeError('Flows must be added before the application startup')
        if hasattr(self._app.state, flow_name):
            raise RuntimeError(f'Flow with name "{flow_name}" already exists in app')
        if with_start:
            flow.start(timeout=get_start_timeout())
        self._names.append(flow_name)
        setattr(self._app.state, flow_name, flow)

    def _flows(self) -> Dict[str, Flow]:
        return {name: getattr(self._app.state, name) for name in self._names}


class _LiveFlows(dict):
    def __init__(self, integrator: AppIntegrator):
        super().__init__()
        self._integrator = integrator

    def items(self):
        return list(self._integrator._flows().items())


class RequestStream:
    """Adapts a Starlette request body to ``readany()``, for ``task.share_value_with_data``."""

    def __init__(self, request):
        self._chunks = request.stream().__aiter__()

    async def readany(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return b''


async def share_request_body(
    task: BaseTask,
    field_name: str,
    request,
    client_max_size: Optional[int] = None,
    timeout: Optional[float] = utils.BODY_TIMEOUT_DEFAULT,
) -> None:
    """Reads the request's body into shared memory as ``task.<field_name>``, at most
    ``client_max_size`` bytes: given here, else the app's (``AppIntegrator(client_max_size=)``),
    else 1 MiB. See :func:`aqueduct.integrations.utils.share_request_body` for the other limits;
    the errors are :data:`PAYLOAD_ERRORS` (a client that hangs up mid-body: ``PayloadLengthError``)."""
    from starlette.requests import ClientDisconnect

    if client_max_size is None:
        client_max_size = getattr(request.app.state, CLIENT_MAX_SIZE, None)
    content_length = request.headers.get('content-length')
    stream = RequestStream(request)
    try:
        await utils.share_request_body(task, field_name, stream, content_length, client_max_size, timeout)
    except ClientDisconnect:
        raise PayloadLengthError('the client closed the connection before the end of the body') from None


def error_response(exc: BaseException, status: Optional[int] = None):
    """The answer to one of :data:`PAYLOAD_ERRORS` (413, 411, 408, 400, 503 with ``Retry-After``);
    to another error, ``status`` with the error's text, or ``None`` without one. Return it from
    the route rather than raise an ``HTTPException``: the task of the failed request, and its
    shared memory, are then gone when the route returns (see ``utils.drop_frames``)."""
    from starlette.responses import PlainTextResponse

    answer = utils.http_error(exc, status)
    if answer is None:
        return None
    utils.drop_frames(exc)
    status, message, headers = answer
    return PlainTextResponse(message, status_code=status, headers=headers)
