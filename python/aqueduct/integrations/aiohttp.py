"""aiohttp integration, as in aqueduct 1.15:

    app = web.Application()
    AppIntegrator(app).add_flow(build_flow())          # starts it (FLOW_START_TIMEOUT)

    async def handler(request):
        await request.app['flow'].process(task)

Flows stop on application shutdown; with ``exit_on_fail`` the app stops (SIGTERM to itself) if
a flow stops for good. The hooks doing so are 1.15's, for apps that wire them by hand:
:func:`run_flows_observer` and :func:`stop_flows_observer` (around :func:`observe_flows`), and
:func:`stop_flows`; they act on the flows named in ``app[AQUEDUCT_FLOW_NAMES]``.

Optional routes: ``metrics_path`` serves Prometheus for every flow added,
``health_path`` answers 200 when all flows are ready and the shared-memory pool has room, and 503
otherwise (for probes).

``await share_request_body(task, 'image', request)`` reads an upload straight into shared memory
within the app's ``client_max_size``; :func:`error_response` answers the errors of doing so
(413, 411, 408, 400, and 503 with ``Retry-After`` for a full pool).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from typing import Any, Dict, Optional

from aiohttp import web

from ..exceptions import PayloadLengthError
from ..flow import Flow
from ..logger import replace_logger
from ..task import BaseTask
from . import utils
from .utils import (  # noqa: F401 - re-exported as in 1.15
    FLOW_START_TIMEOUT_DEFAULT,
    FLOW_START_TIMEOUT_NAME,
    PAYLOAD_ERRORS,
    exit_when_stopped,
    get_start_timeout,
    health_payload,
)

AQUEDUCT_FLOW_NAMES = 'aqueduct_flow_names'
FLOW_NAME = 'flow'
FLOWS_OBSERVER = 'aqueduct_flows_observer'


def _app_flows(app: web.Application) -> Dict[str, Flow]:
    return {name: app[name] for name in app[AQUEDUCT_FLOW_NAMES]}


async def _attach_flows(app: web.Application) -> None:
    """Watches the running flows from the app's loop from now on (worker deaths, metrics), not
    from their first task."""
    loop = asyncio.get_running_loop()
    for flow in _app_flows(app).values():
        if flow.is_running and flow._loop is not loop:
            flow.attach()


async def observe_flows(app: web.Application, check_interval: float = 1.0) -> None:
    """Stops this server process (SIGTERM to itself) once one of the app's flows has stopped
    for good: a service whose pipeline is gone must not keep accepting requests. The flows are
    watched rather than polled: ``check_interval`` (1.15's polling period) is accepted and unused."""
    await _attach_flows(app)
    await exit_when_stopped(_app_flows(app))


async def run_flows_observer(app: web.Application) -> None:
    """An ``on_startup`` hook: runs :func:`observe_flows` in the background."""
    _set(app, FLOWS_OBSERVER, asyncio.ensure_future(observe_flows(app)))


async def stop_flows_observer(app: web.Application) -> None:
    """An ``on_shutdown`` hook: the app is stopping on purpose, so its flows stopping is no failure."""
    app[FLOWS_OBSERVER].cancel()


async def stop_flows(app: web.Application) -> None:
    """An ``on_shutdown`` hook: stops the app's flows (gracefully)."""
    for flow in _app_flows(app).values():
        await flow.stop()


class AppIntegrator:
    """Adds flows to an aiohttp app and ties their life cycle to it."""

    def __init__(
        self,
        app: web.Application,
        exit_on_fail: bool = True,
        logger: Optional[logging.Logger] = None,
        metrics_path: Optional[str] = None,
        health_path: Optional[str] = None,
    ) -> None:
        if AQUEDUCT_FLOW_NAMES in app:
            raise RuntimeError('AppIntegrator can be created only once. Reuse existing AppIntegrator.')
        self._app = app
        _set(app, AQUEDUCT_FLOW_NAMES, [])
        app.on_startup.append(_attach_flows)
        if exit_on_fail:
            app.on_startup.append(run_flows_observer)
            app.on_shutdown.append(stop_flows_observer)
        app.on_shutdown.append(stop_flows)
        if logger is not None:
            replace_logger(logger)
        if metrics_path is not None:
            from prometheus_client import CollectorRegistry

            from ..metrics.prometheus import FlowCollector, aiohttp_handler

            registry = CollectorRegistry()
            registry.register(FlowCollector(_LiveFlows(app)))
            app.router.add_get(metrics_path, aiohttp_handler(registry))
        if health_path is not None:
            app.router.add_get(health_path, self._health)

    def add_flow(self, flow: Flow, flow_name: str = FLOW_NAME, with_start: bool = True) -> None:
        if flow_name in self._app:
            raise RuntimeError(f'Flow with name "{flow_name}" already exists in app')
        if with_start:
            flow.start(timeout=get_start_timeout())
        self._app[AQUEDUCT_FLOW_NAMES].append(flow_name)
        _set(self._app, flow_name, flow)

    def _flows(self) -> Dict[str, Flow]:
        return _app_flows(self._app)

    async def _health(self, request: web.Request) -> web.Response:
        status, body = health_payload(self._flows())
        return web.json_response(body, status=status)


def _set(app: web.Application, key: str, value: Any) -> None:
    """Stores ``value`` under a string key: handlers written for 1.15 read ``app['flow']``, so
    the keys stay strings, and the warning newer aiohttp gives for string keys is not the
    user's to see."""
    with warnings.catch_warnings():
        not_app_key = getattr(web, 'NotAppKeyWarning', None)
        if not_app_key is not None:
            warnings.simplefilter('ignore', not_app_key)
        app[key] = value


class _LiveFlows(dict):
    """The app's flows as the Prometheus collector sees them, looked up at scrape time."""

    def __init__(self, app: web.Application):
        super().__init__()
        self._app = app

    def items(self):
        return [(name, self._app[name]) for name in self._app[AQUEDUCT_FLOW_NAMES]]


async def share_request_body(
    task: BaseTask, field_name: str, request: web.Request, timeout: Optional[float] = utils.BODY_TIMEOUT_DEFAULT
) -> None:
    """Reads the request's body into shared memory as ``task.<field_name>``, refusing what aiohttp
    itself would: more than the app's ``client_max_size`` (``web.Application(client_max_size=)``,
    1 MiB by default; 0 for no limit). See :func:`aqueduct.integrations.utils.share_request_body`
    for the other limits; the errors are :data:`PAYLOAD_ERRORS` (a client that hangs up mid-body:
    ``PayloadLengthError``)."""
    # `share_value_with_data` bypasses aiohttp's own check (made in `read()`), so the limit is
    # passed on; the private attribute is the one aiohttp has read it from since 3.0.
    limit = request._client_max_size
    try:
        await utils.share_request_body(task, field_name, request.content, request.content_length, limit, timeout)
    except ConnectionResetError:  # how aiohttp ends the body of a client that hung up
        raise PayloadLengthError('the client closed the connection before the end of the body') from None


def error_response(exc: BaseException, status: Optional[int] = None) -> Optional[web.Response]:
    """The answer to one of :data:`PAYLOAD_ERRORS` (413, 411, 408, 400, 503 with ``Retry-After``);
    to another error, ``status`` with the error's text, or ``None`` without one. Return it from
    the handler rather than raise an ``HTTPException``: the task of the failed request, and its
    shared memory, are then gone when the handler returns (see ``utils.drop_frames``)."""
    answer = utils.http_error(exc, status)
    if answer is None:
        return None
    utils.drop_frames(exc)
    status, message, headers = answer
    return web.Response(status=status, text=message, headers=headers)
