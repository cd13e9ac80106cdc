"""TS Pro Relay web process: the portal's JSON API (and, later, the admin UI)."""
