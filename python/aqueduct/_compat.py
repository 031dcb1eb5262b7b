"""Stand-ins for the parts of aqueduct 1.15's engine that have no counterpart here.

Such a name stays importable, so that code (or a test suite) that merely imports it keeps working;
using it raises :class:`~aqueduct.exceptions.NotSupportedError` naming what replaces it.
``docs/migrating.md`` lists every one.
"""

from __future__ import annotations

from typing import Any, Callable, NoReturn

from .exceptions import NotSupportedError


def _refuse(name: str, replacement: str) -> NoReturn:
    raise NotSupportedError(f'{name} is a part of aqueduct 1.15\'s engine that this one does not have: {replacement}')


def removed_class(module: str, name: str, replacement: str, methods: tuple = ()) -> type:
    """A class that refuses to be instantiated (it can still be imported, subclassed, or named
    in annotations and ``isinstance`` checks, which nothing passes). ``methods``: 1.15's public
    method names, present (so code that names them loads) and refusing too."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _refuse(f'{module}.{name}', replacement)

    namespace: dict = {'__init__': refuse, '__module__': module, '__doc__': f'Not available: {replacement}'}
    namespace.update((method, refuse) for method in methods)
    return type(name, (), namespace)


def removed_function(module: str, name: str, replacement: str) -> Callable[..., NoReturn]:
    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        _refuse(f'{module}.{name}', replacement)

    refuse.__name__ = refuse.__qualname__ = name
    refuse.__module__ = module
    refuse.__doc__ = f'Not available: {replacement}'
    return refuse
