"""`tspro-relay`: the command line, above the three packages it starts and administers.

It lives outside relay_core so that the shared core never imports the web or
the worker: starting a process (`run`, `web`, `worker`) needs them, and only
this package may reach down to all three.
"""
