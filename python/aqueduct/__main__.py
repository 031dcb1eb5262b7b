"""``python -m aqueduct top`` (see :mod:`aqueduct.top`) and ``python -m aqueduct serve`` (see
:mod:`aqueduct.sockets.flow_server`)."""

import sys

USAGE = """usage: python -m aqueduct top [socket] [--interval SECONDS] [--once]
       python -m aqueduct serve module:build_flow [--socket PATH] [--allowed-gid GID] [--start-timeout SECONDS]"""

if __name__ == '__main__':
    args = sys.argv[1:]
    if args and args[0] == 'top':
        from .top import main

        sys.exit(main(args[1:]))
    if args and args[0] == 'serve':
        from .sockets.flow_server import main as serve

        sys.exit(serve(args[1:]))
    print(USAGE, file=sys.stderr)
    sys.exit(2)
