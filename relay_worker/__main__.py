"""`python -m relay_worker`: the same as `tspro-relay worker`.

It becomes that command (exec) rather than importing the command line, which
sits above this package and starts the web process too.
"""

import os
import sys

os.execv(sys.executable, [sys.executable, "-m", "relay_cli", "worker", *sys.argv[1:]])
