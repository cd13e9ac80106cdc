"""TS Pro Relay core: settings, crypto, the store, messages, SMTP and the queue.

Nothing in this package knows about HTTP; both the web and the worker
processes import it.
"""

__version__ = "0.1.0"
