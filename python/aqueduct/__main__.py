"""``python -m aqueduct top``: see :mod:`aqueduct.top`."""

import sys

from .top import main

if __name__ == '__main__':
    args = sys.argv[1:]
    if not args or args[0] != 'top':
        print('usage: python -m aqueduct top [socket] [--interval SECONDS] [--once]', file=sys.stderr)
        sys.exit(2)
    sys.exit(main(args[1:]))
