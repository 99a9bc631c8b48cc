"""Three network namespaces in a line, both families on every link, for tests and short
measurements that need real stacks but not Mininet's switches or link emulation:

    client ns                    converter ns                          server ns
    fd00:95::1  10.95.0.1  --  fd00:95::2 10.95.0.2 | fd00:96::1 10.96.0.1  --  fd00:96::2  10.96.0.2

The converter namespace forwards both families, the client's and the server's default routes point
at it (so transparent mode sees the client's traffic to the server). Every process started with
start() and the namespaces themselves are gone after close(), also when set-up fails half-way.

    with NamespaceLine() as line:
        line.start(line.server_ns, ["python3", "-m", "http.server"])
        line.sh(line.client_ns, "curl -s http://10.96.0.2:8000/")
"""
from __future__ import annotations

import subprocess
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class End:
    """One side of a link: its namespace, device and addresses."""
    ns: str
    dev: str
    v6: str
    v4: str


class NamespaceLine:
    """client -- converter -- server, each a network namespace; see the module's docstring."""

    CLIENT6, CLIENT4, MB_C6, MB_C4 = "fd00:95::1", "10.95.0.1", "fd00:95::2", "10.95.0.2"
    MB_S6, MB_S4, SERVER6, SERVER4 = "fd00:96::1", "10.96.0.1", "fd00:96::2", "10.96.0.2"
    NETS = ("fd00:95::/64", "10.95.0.0/24", "fd00:96::/64", "10.96.0.0/24")

    def __init__(self, prefix: str = "mimbox-line"):
        tag = uuid.uuid4().hex[:6]
        self.client_ns, self.mb_ns, self.server_ns = (f"{prefix}-{r}-{tag}" for r in ("cli", "mb", "srv"))
        self.procs: list[subprocess.Popen] = []
        self.made: list[str] = []
        try:
            for ns in (self.client_ns, self.mb_ns, self.server_ns):
                self.sh(None, f"ip netns add {ns}")
                self.made.append(ns)
                self.sh(ns, "ip link set lo up")
            self._link(End(self.client_ns, f"lc{tag}", self.CLIENT6, self.CLIENT4),
                       End(self.mb_ns, f"lm{tag}", self.MB_C6, self.MB_C4))
            self._link(End(self.mb_ns, f"ls{tag}", self.MB_S6, self.MB_S4),
                       End(self.server_ns, f"lv{tag}", self.SERVER6, self.SERVER4))
            self.mb_client_dev, self.mb_server_dev = f"lm{tag}", f"ls{tag}"
            for cmd in ("sysctl -qw net.ipv4.ip_forward=1", "sysctl -qw net.ipv6.conf.all.forwarding=1"):
                self.sh(self.mb_ns, cmd)
            for ns, gw6, gw4 in ((self.client_ns, self.MB_C6, self.MB_C4), (self.server_ns, self.MB_S6, self.MB_S4)):
                self.sh(ns, f"ip route add default via {gw4}")
                self.sh(ns, f"ip -6 route add default via {gw6}")
        except BaseException:
            self.close()
            raise

    def _link(self, a: End, b: End) -> None:
        self.sh(None, f"ip link add {a.dev} netns {a.ns} type veth peer name {b.dev} netns {b.ns}")
        for e in (a, b):
            self.sh(e.ns, f"ip link set {e.dev} up")
            self.sh(e.ns, f"ip addr add {e.v4}/24 dev {e.dev}")
            self.sh(e.ns, f"ip addr add {e.v6}/64 dev {e.dev} nodad")

    @staticmethod
    def sh(ns: str | None, cmd: str, check: bool = True) -> str:
        """Run `cmd` (split on spaces) in namespace `ns` (None: here); its stdout. Fails loudly."""
        full = (["ip", "netns", "exec", ns] if ns else []) + cmd.split()
        p = subprocess.run(full, capture_output=True, text=True, timeout=30)
        if check and p.returncode != 0:
            raise RuntimeError(f"{cmd} (in {ns}): {p.stderr.strip()}")
        return p.stdout

    def start(self, ns: str, args: list[str], **kw) -> subprocess.Popen:
        """Start a process in `ns`; close() ends it."""
        p = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)
        self.procs.append(p)
        return p

    def run(self, ns: str, args: list[str], timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a process in `ns` to its end (at most `timeout` seconds)."""
        return subprocess.run(["ip", "netns", "exec", ns, *args], capture_output=True, text=True,
                              timeout=timeout, **kw)

    def close(self) -> None:
        """End every started process (TERM, then KILL), delete the namespaces (their links go too)."""
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        self.procs.clear()
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    def __enter__(self) -> "NamespaceLine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
