"""aqueduct 1.15's ``aqueduct.utils``: the environment variable names of a named ``SocketFlow``."""


def get_env_with_prefix(prefix: str, env_name: str) -> str:
    """``'{prefix}_{env_name}'``: the variable a ``SocketFlow(name=prefix)`` reads (an empty
    name gives a leading ``_``, as in 1.15)."""
    return '_'.join((prefix, env_name))


__all__ = ['get_env_with_prefix']
