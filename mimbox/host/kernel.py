"""This host's kernel as the converter and the testbed probe it: each probe tries the feature for real
(in a throwaway network namespace where it touches networking) and never guesses from the kernel
version; and the mounts the BPF parts need (ensure_mounts). `mimbox doctor` (mimbox.ops.doctor) puts
the probes together; the link class (netem or the fallback) and tests that must say why a kernel
feature is missing use them one by one.
"""
from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import uuid

from mimbox.wire.mptcp import IPPROTO_MPTCP  # noqa: F401 - defined once, there

CGROUP2_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")
BPFFS = "/sys/fs/bpf"
QDISC_PROBE_ARGS = {"netem": ["delay", "1ms"], "htb": ["default", "1"],
                    "tbf": ["rate", "1mbit", "burst", "10k", "latency", "10ms"], "fq": []}


def run(cmd: list[str], netns: str | None = None, check: bool = False, timeout: float = 20,
        **kw) -> subprocess.CompletedProcess:
    """Run a command (inside `netns` if given) and capture its output as text."""
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=timeout, **kw)


@contextlib.contextmanager
def throwaway_netns(prefix: str = "mimbox-probe"):
    """A named network namespace with an interface `d0` (one end of a veth pair: the dummy driver
    may be a module this kernel cannot load), deleted on exit whatever happens."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    run(["ip", "netns", "add", name], check=True)
    try:
        run(["ip", "link", "add", "d0", "type", "veth", "peer", "name", "d1"], netns=name, check=True)
        run(["ip", "link", "set", "d0", "up"], netns=name)
        run(["ip", "link", "set", "d1", "up"], netns=name)
        run(["ip", "link", "set", "lo", "up"], netns=name)
        yield name
    finally:
        run(["ip", "netns", "del", name])


def try_cmd(cmd: list[str], netns: str | None = None) -> tuple[bool, str]:
    try:
        p = run(cmd, netns=netns)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    lines = (p.stderr or p.stdout).strip().splitlines()
    return p.returncode == 0, (lines[-1] if lines else "ok")


def sysctl(path: str) -> str | None:
    try:
        with open("/proc/sys/" + path.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def qdisc_works(kind: str) -> bool:
    """True when `tc qdisc add ... <kind>` succeeds (tried on a dummy device)."""
    with throwaway_netns() as ns:
        ok, _ = try_cmd(["tc", "qdisc", "add", "dev", "d0", "root", "handle", "1:", kind, *QDISC_PROBE_ARGS[kind]], ns)
    return ok


def mptcp_socket_works(family: int = socket.AF_INET) -> bool:
    try:
        socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
        return True
    except OSError:
        return False


def dual_stack_mptcp_works() -> tuple[bool, str]:
    """An MPTCP listener on [::] taking an IPv4 client (what `--listen [::]:PORT` relies on)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM, IPPROTO_MPTCP) as ls:
            ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            ls.bind(("::", 0))
            ls.listen(1)
            with socket.create_connection(("127.0.0.1", ls.getsockname()[1]), timeout=2):
                peer = ls.accept()[0]
                addr = peer.getpeername()[0]
                peer.close()
        return addr == "::ffff:127.0.0.1", f"an IPv4 client accepted as {addr}"
    except OSError as e:
        return False, str(e)


def mptcp_reuseport_works() -> tuple[bool, str]:
    """Two MPTCP listeners on one port with SO_REUSEPORT (what `mimbox run --workers N` needs)."""
    socks = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", socks[0].getsockname()[1] if len(socks) > 1 else 0))
            s.listen(1)
        return True, f"two MPTCP listeners on 127.0.0.1:{socks[0].getsockname()[1]}"
    except OSError as e:
        return False, str(e)
    finally:
        for s in socks:
            s.close()


def cgroup2_root() -> str | None:
    """The cgroup2 mount point where we can create child groups, or None."""
    for root in CGROUP2_ROOTS:
        if os.path.exists(os.path.join(root, "cgroup.procs")):
            probe = os.path.join(root, f"mimbox-probe-{os.getpid()}")
            try:
                os.mkdir(probe)
                os.rmdir(probe)
                return root
            except OSError:
                continue
    return None


def ensure_mounts() -> str:
    """Make sure cgroup2 and bpffs are mounted in this mount namespace; return the cgroup2 root.

    Mininet hosts get a fresh /sys of their own (mnexec remounts sysfs), without these mounts;
    mounting them there is private to the host and goes away with it.
    """
    root = cgroup2_root()
    if root is None:
        target = "/sys/fs/cgroup"
        if os.path.ismount(target):
            target = "/sys/fs/cgroup/unified"
            os.makedirs(target, exist_ok=True)
        run(["mount", "-t", "cgroup2", "none", target], check=True)
        root = cgroup2_root()
        if root is None:
            raise RuntimeError("cgroup2 is mounted but no child group can be created")
    if not os.path.ismount(BPFFS):
        run(["mount", "-t", "bpf", "bpf", BPFFS], check=True)
    return root


def read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
