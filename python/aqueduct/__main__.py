"""``python -m aqueduct top`` (see :mod:`aqueduct.top`), ``python -m aqueduct serve`` (see
:mod:`aqueduct.sockets.flow_server`) and ``python -m aqueduct calibrate`` (see
:mod:`aqueduct.calibrate`)."""

import sys

USAGE = """usage: python -m aqueduct top [socket] [--interval SECONDS] [--once]
       python -m aqueduct serve module:build_flow [--socket PATH] [--allowed-gid GID] [--start-timeout SECONDS]
       python -m aqueduct serve module:build_flow --http HOST:PORT [--route PATH=STEP ...] [--timeout SECONDS]
                                                   [--idle-timeout SECONDS]
       python -m aqueduct calibrate [--rounds N] [--processes N] [--json]"""

if __name__ == '__main__':
    args = sys.argv[1:]
    if args and args[0] == 'top':
        from .top import main

        sys.exit(main(args[1:]))
    if args and args[0] == 'serve':
        from .sockets.flow_server import main as serve

        sys.exit(serve(args[1:]))
    if args and args[0] == 'calibrate':
        from .calibrate import main as calibrate

        sys.exit(calibrate(args[1:]))
    print(USAGE, file=sys.stderr)
    sys.exit(2)
