"""What can sit on the converter host. Every system is started and stopped the same way:

    sys = MiMBox(mode="explicit")
    sys.start(tb, server_port=80)       # on tb.mbox
    argv = sys.client_argv(tb, ["wrk", ...], url_host_port)   # how the client reaches the server through it
    sys.pids()                          # for CPU accounting
    sys.stop()

so an experiment is a loop over systems and parameters, with no special cases per peer.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from mimbox.paths import MPTCPIZE

PY = sys.executable


def wait_port(host, port: int, timeout: float = 10.0) -> None:
    """Wait until something on `host` listens on TCP `port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if host.cmd(f"ss -Hltn 'sport = :{port}'").strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


class System:
    """Base: a set of processes on the converter host."""
    name = "system"
    #: True when the client talks MPTCP to the converter and the converter TCP to the server
    converts = True

    def __init__(self, cpus: str | None = None):
        self.cpus = cpus           # taskset list for the converter's processes, e.g. "1"
        self.procs: list[subprocess.Popen] = []
        self.host = None
        self.port = None

    def _popen(self, host, argv: list[str], **kw) -> subprocess.Popen:
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = host.popen(argv, **kw)
        self.procs.append(p)
        return p

    def start(self, tb, server_port: int) -> None:
        """Start on tb.mbox, relaying to tb.server's `server_port`."""
        self.host = tb.mbox

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL); idempotent."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def pids(self) -> list[int]:
        """PIDs whose CPU time is the converter's cost (children included by the caller)."""
        return [p.pid for p in self.procs if p.poll() is None]

    def endpoint(self, tb, server_port: int) -> tuple[str, int]:
        """Where the client connects."""
        return tb.mbox_client_ip, self.port

    def client_argv(self, tb, argv: list[str], mptcp: bool = True) -> list[str]:
        """The client command, wrapped as this system needs (with the MPTCP shim if `mptcp`)."""
        return ["env", f"LD_PRELOAD={MPTCPIZE}", *argv] if mptcp else list(argv)

    def __repr__(self) -> str:
        return self.name


class Router(System):
    """Plain IP forwarding on the converter host; the server speaks MPTCP (the paper's baseline)."""
    name = "router"
    converts = False

    def endpoint(self, tb, server_port: int) -> tuple[str, int]:
        return tb.server_ip, server_port


class MiMBox(System):
    """Our converter, started with `mimbox run` on the converter host."""

    def __init__(self, mode: str = "static", engine: str = "splice", port: int = 7000, extra: list[str] = (),
                 cpus: str | None = None):
        super().__init__(cpus)
        self.mode, self.engine, self.port, self.extra = mode, engine, port, list(extra)
        self.name = "mimbox" if engine == "splice" else f"mimbox-{engine}"
        self.log = b""

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        argv = [PY, "-m", "mimbox.cli", "run", "--listen", f"0.0.0.0:{self.port}", "--mode", self.mode,
                "--engine", self.engine, "--stats", f"/run/mimbox/test-{self.port}-{os.getpid()}.sock",
                *self.extra]
        if self.mode == "static":
            argv += ["--upstream", f"{tb.server_ip}:{server_port}"]
        if self.mode == "transparent":
            argv += ["--intercept", str(server_port)]
        self.proc = self._popen(tb.mbox, argv)
        line = self.proc.stdout.readline().decode()
        if "ready" not in line:
            err = self.proc.stderr.read().decode() if self.proc.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"mimbox did not start: {line} {err}")

    @property
    def stats_path(self) -> str:
        return f"/run/mimbox/test-{self.port}-{os.getpid()}.sock"

    def stats(self) -> dict:
        from mimbox.stats import query
        return query(self.stats_path)

    def stop(self) -> None:
        procs = list(self.procs)
        super().stop()
        for p in procs:
            if p.stderr is not None:
                self.log += p.stderr.read() or b""

    def endpoint(self, tb, server_port: int) -> tuple[str, int]:
        if self.mode == "static":
            return tb.mbox_client_ip, self.port
        return tb.server_ip, server_port   # explicit (redirected by the client's BPF) and transparent

    def client_argv(self, tb, argv: list[str], mptcp: bool = True) -> list[str]:
        if self.mode == "explicit":
            return [PY, "-m", "mimbox.cli", "client", "--via", f"{tb.mbox_client_ip}:{self.port}",
                    *(["--mptcp"] if mptcp else []), "--", *argv]
        return super().client_argv(tb, argv, mptcp)
