"""Integrations with web frameworks: :mod:`.aiohttp`, :mod:`.fastapi` (and Starlette), and
:mod:`aqueduct.sockets` for one flow shared by several web worker processes."""
