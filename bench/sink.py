"""A counting SMTP sink for the benchmarks: aiosmtpd on 127.0.0.1, optional delay per message.

    python bench/sink.py PORT [DELAY_SECONDS] [--starttls CERT KEY]

It prints nothing per message; the benchmark counts deliveries in the relay's store.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.delay:
            await asyncio.sleep(self.delay)
        return "250 2.0.0 OK"


def main() -> None:
    port = int(sys.argv[1])
    delay = float(sys.argv[2]) if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else 0.0
    kwargs = {}
    if "--starttls" in sys.argv:
        at = sys.argv.index("--starttls")
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(sys.argv[at + 1], sys.argv[at + 2])
        kwargs = {"tls_context": context, "require_starttls": True}
    controller = Controller(Sink(delay), hostname="127.0.0.1", port=port, data_size_limit=0, **kwargs)
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        controller.stop()


if __name__ == "__main__":
    main()
