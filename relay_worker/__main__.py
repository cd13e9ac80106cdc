"""`python -m relay_worker`: the same as `tspro-relay worker`."""

import sys

from relay_core.cli import main

sys.exit(main(["worker", *sys.argv[1:]]))
