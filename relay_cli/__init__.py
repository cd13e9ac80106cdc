"""`tspro-relay`: the command line, above the three packages it starts and administers, so the
shared core never imports the web or the worker."""
