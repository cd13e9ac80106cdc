"""A counting SMTP sink for the benchmarks: aiosmtpd on 127.0.0.1, optional delay per message.

    python bench/sink.py PORT [DELAY_SECONDS] [--starttls CERT KEY | --bare]

It prints nothing per message; the benchmark counts deliveries in the relay's store.
``--bare``: no aiosmtpd, a few lines of asyncio answering 250 to everything
(no delay, no STARTTLS). aiosmtpd parses every command and header in Python
and takes most of a CPU near 700 messages/s, which on a 2-CPU box makes the
sink, not the relay, what a drain measures.
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


class BareSink(asyncio.Protocol):
    """Just enough SMTP for a client that pipelines nothing: one reply per command, 250 after DATA."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        transport.write(b"220 sink ESMTP\r\n")  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer, self.in_data = self.buffer[end + 5:], False
                self.transport.write(b"250 2.0.0 OK\r\n")  # type: ignore[attr-defined]
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            verb, self.buffer = self.buffer[:4].upper(), self.buffer[end + 2:]
            if verb == b"EHLO":
                self.transport.write(b"250-sink\r\n250 8BITMIME\r\n")  # type: ignore[attr-defined]
            elif verb == b"DATA":
                self.in_data = True
                self.buffer = b"\r\n" + self.buffer  # (so a body of nothing but "." still ends)
                self.transport.write(b"354 go on\r\n")  # type: ignore[attr-defined]
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")  # type: ignore[attr-defined]
                self.transport.close()
                return
            else:
                self.transport.write(b"250 OK\r\n")  # type: ignore[attr-defined]


async def serve_bare(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(BareSink, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    port = int(sys.argv[1])
    if "--bare" in sys.argv:
        try:
            asyncio.run(serve_bare(port))
        except KeyboardInterrupt:
            pass
        return
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
