"""`python -m relay_worker`: the same as `tspro-relay worker`."""

import sys

from relay_cli.main import main

sys.exit(main(["worker", *sys.argv[1:]]))
