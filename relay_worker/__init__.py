"""TS Pro Relay worker process: the Huey consumer that delivers queued mail."""
