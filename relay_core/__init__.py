"""TS Pro Relay core: what the web and the worker both stand on; nothing here knows HTTP."""

__version__ = "0.1.0"
