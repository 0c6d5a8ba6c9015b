"""`python -m deqloop ...`: the command line of deqloop/cli.py."""

import sys

from deqloop.cli import main

sys.exit(main())
