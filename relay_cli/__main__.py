"""`python -m relay_cli`: the same as `tspro-relay` (the supervisor starts its children this way)."""

import sys

from .main import main

sys.exit(main())
