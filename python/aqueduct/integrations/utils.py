"""Helpers shared by the integrations."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Optional

from ..logger import log

FLOW_START_TIMEOUT_NAME = 'FLOW_START_TIMEOUT'
FLOW_START_TIMEOUT_DEFAULT = 300.0


def get_start_timeout() -> Optional[float]:
    """``FLOW_START_TIMEOUT`` seconds (default 300); ``<= 0`` means no timeout."""
    try:
        timeout = float(os.environ.get(FLOW_START_TIMEOUT_NAME, FLOW_START_TIMEOUT_DEFAULT))
    except ValueError:
        timeout = FLOW_START_TIMEOUT_DEFAULT
    return None if timeout <= 0 else timeout


async def exit_when_stopped(flows: dict) -> None:
    """Stops this server process (SIGTERM) once any flow has stopped for good: a service whose
    pipeline is gone must not keep accepting requests."""
    waits = {asyncio.ensure_future(flow.wait_stopped()): name for name, flow in flows.items()}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
    name = waits[next(iter(done))]
    log.error('Flow %s is not running, application will be stopped', name)
    os.kill(os.getpid(), signal.SIGTERM)


def health_payload(flows: dict) -> tuple:
    """``(status, body)`` for a ``/healthz`` route: 200 when every flow is ready, else 503."""
    report = {name: flow.health() for name, flow in flows.items()}
    ready = all(r['ready'] for r in report.values())
    return (200 if ready else 503), report
