"""The parent of `tspro-relay run`: holds the listening socket and runs the web and worker processes.

A bare interpreter (exec'd by `tspro-relay run` once the socket is bound) that
imports nothing of the relay, so what stays for the relay's lifetime is small.
The socket stays open here, so a web process replaced on SIGHUP hands over to the
next without a refused connection; a new one that fails leaves the old serving.
The signals are described in docs/architecture.md.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

READY_TIMEOUT = 30.0  # seconds a new web process has to say it serves


JSON_LOGS = False  # RELAY_LOG_FORMAT=json: every line the relay writes is one JSON object


def say(text: str, event: str = "supervisor") -> None:
    if JSON_LOGS:
        import json
        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        line = json.dumps({"time": f"{stamp}.{int(now % 1 * 1000):03d}Z", "level": "INFO", "event": event,
                           "logger": "relay.supervisor", "message": text})
    else:
        line = f"tspro-relay: {text}"
    try:
        os.write(2, f"{line}\n".encode())
    except OSError:
        pass  # no terminal any more: nothing to tell


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _as_a_child() -> None:
    """In the child, before exec: the default signal actions back, then the signals let through.

    The parent blocks them around the fork, so one that arrives in between is neither run by the
    parent's handler in the child (lost at exec) nor missed: it stays pending until here, where
    it ends the child as it would a new process. A SIGKILLed parent takes its children with it.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    try:
        import ctypes
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def spawn(role: str, *args: str, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen[bytes]:
    # A session of its own: Ctrl-C in a terminal signals the whole foreground group, and a
    # second SIGINT could turn a graceful stop into an immediate one.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return subprocess.Popen([sys.executable, "-m", "relay_cli", role, *args], pass_fds=pass_fds,
                                start_new_session=True, preexec_fn=_as_a_child)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class Supervisor:
    def __init__(self, listen_fd: int, with_worker: bool) -> None:
        self.listen_fd = listen_fd
        self.with_worker = with_worker
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.retiring: list[subprocess.Popen[bytes]] = []  # replaced children finishing their work
        self.stopping = False
        self.reload_asked = False
        self.asked: set[int] = set()  # children sent their SIGINT (a second one could cut a delivery short)

    def start_web(self) -> subprocess.Popen[bytes] | None:
        """A web process on the socket, once it says it serves; None (and it is gone) when it fails."""
        read_end, write_end = os.pipe()
        try:
            child = spawn("web", "--fd", str(self.listen_fd), "--ready-fd", str(write_end),
                          pass_fds=(self.listen_fd, write_end))
        except OSError:  # the socket was closed by a stop that arrived meanwhile
            os.close(read_end)
            return None
        finally:
            os.close(write_end)
        try:
            if self._wait_ready(read_end, child):
                return child
        finally:
            os.close(read_end)
        if self.stopping:  # asked to stop while it started: let it stop as the others do
            self._retire(child)
            return None
        if child.poll() is None:
            child.kill()
        code = child.wait()
        say(f"the new web process did not start (exit code {code}; its reason is logged above).")
        return None

    def _wait_ready(self, read_end: int, child: subprocess.Popen[bytes]) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                readable, _, _ = select.select([read_end], [], [], min(left, 0.5))
            except InterruptedError:
                continue
            if readable:
                return os.read(read_end, 16).startswith(b"ready")  # EOF: it exited first
            if child.poll() is not None:
                return False
        return False

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._stop)
        signal.signal(signal.SIGHUP, self._ask_reload)
        self.web = self.start_web()
        if self.web is None:
            failed = not self.stopping
            self._stop(signal.SIGINT, None)
            return self._wait_all(1 if failed else 0)
        if self.with_worker:  # after the web serves: on one CPU the two would slow each other's start
            self.worker = spawn("worker")
        return self._watch()

    def _watch(self) -> int:
        code = 0
        while not self.stopping:
            if self.reload_asked:
                self.reload_asked = False
                self.reload()
            for child in (self.web, self.worker):
                if child is not None and child.poll() is not None and not self.stopping:
                    role = "web" if child is self.web else "worker"
                    say(f"the {role} process stopped (exit code {child.returncode}); stopping the relay.")
                    code = child.returncode or 1
                    self._stop(signal.SIGINT, None)
            self.retiring = [child for child in self.retiring if child.poll() is None]
            time.sleep(0.2)
        return self._wait_all(code)

    def reload(self) -> None:
        say("reloading: starting a new web process on the same socket.")
        web = self.start_web()
        if web is None:
            if not self.stopping:
                say("reload failed; the running processes keep serving.")
            return
        old, self.web = self.web, web
        self._retire(old)
        if self.with_worker:
            old, self.worker = self.worker, spawn("worker")
            self._retire(old)  # its deliveries in flight finish before it exits
        say("reloaded.")

    def _retire(self, child: subprocess.Popen[bytes] | None) -> None:
        if child is not None:
            self.retiring.append(child)
            self._ask_to_finish([child])

    def _ask_reload(self, signum: int, frame: object) -> None:
        self.reload_asked = True

    def _stop(self, signum: int, frame: object) -> None:
        if not self.stopping:
            # No new process will serve this socket: let it close with the web process's copy, so
            # a proxy in front gets "connection refused" (which it may retry elsewhere or later)
            # instead of a connection that waits in the backlog for nobody.
            os.close(self.listen_fd)
        self.stopping = True
        self._ask_to_finish()

    def _ask_to_finish(self, children: list[subprocess.Popen[bytes] | None] | None = None) -> None:
        """SIGINT, once, to each child (all of them by default): a graceful stop for both roles."""
        for child in children if children is not None else [self.web, self.worker, *self.retiring]:
            if child is not None and child.pid not in self.asked and child.poll() is None:
                self.asked.add(child.pid)
                child.send_signal(signal.SIGINT)

    def _wait_all(self, code: int) -> int:
        self._ask_to_finish()  # a child started as the stop arrived (its handler ran before it was known)
        for child in (self.web, self.worker, *self.retiring):
            if child is not None:
                while True:
                    try:
                        child.wait()
                        break
                    except InterruptedError:
                        continue
        return code


def find_supervisors(port: int | None = None) -> list[tuple[int, int]]:
    """(pid, port) of every supervisor this user may signal, on ``port`` only when given."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "relay_web.supervisor" not in words or "--port" not in words:
            continue
        served = int(words[words.index("--port") + 1])
        if port is None or served == port:
            found.append((int(entry), served))
    return found


def main(argv: list[str]) -> int:
    """``run|web --port P --fd N [--json-logs]``: the role, the port it serves (for `reload`), the socket."""
    global JSON_LOGS
    listen_fd = int(argv[argv.index("--fd") + 1])
    JSON_LOGS = "--json-logs" in argv
    return Supervisor(listen_fd, with_worker=argv[0] == "run").run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
