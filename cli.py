"""`python cli.py ...` from a checkout: the same program as the installed `deqloop` command and
`python -m deqloop` (the code is deqloop/cli.py)."""

import sys

from deqloop.cli import main

if __name__ == "__main__":
    sys.exit(main())
