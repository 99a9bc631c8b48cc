"""Clear start-up errors: what `mimbox run` checks before it starts anything, and how a worker's
failure to start is told in one line (the supervisor prints it; `--debug` keeps the traceback).

    preflight(cfg, workers)   root, MPTCP, the listen port free, the service user: StartupError
    explain(exc, cfg, w)      an exception of a starting worker -> one line naming the fix
"""
from __future__ import annotations

import errno
import os
import socket

from mimbox.config import Config
from mimbox.wire.mptcp import family_of

CAP_NET_ADMIN, CAP_SETGID, CAP_SETUID = 12, 6, 7


class StartupError(RuntimeError):
    """The converter cannot start; the message says what is missing and how to fix it."""


def _effective_caps() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def preflight(cfg: Config, workers: int) -> None:
    """Raise StartupError for what would make the converter fail while starting."""
    lc = cfg.listener
    caps = _effective_caps()
    if not caps >> CAP_NET_ADMIN & 1:
        raise StartupError("needs root (CAP_NET_ADMIN for its netfilter rules, NFQUEUE and BPF; CAP_SETUID/"
                           "CAP_SETGID to then drop to --user): run it as root, e.g. with sudo or as the service")
    if cfg.user != "root" and not (caps >> CAP_SETUID & 1 and caps >> CAP_SETGID & 1):
        raise StartupError(f"cannot drop to --user {cfg.user} without CAP_SETUID and CAP_SETGID: run it as root")
    if lc.client_mptcp or lc.server_mptcp:
        try:
            socket.socket(family_of(lc.addr), socket.SOCK_STREAM, 262).close()
        except OSError as e:
            raise StartupError(f"this kernel gives no MPTCP sockets ({e.strerror}): enable it "
                               "(sysctl -w net.mptcp.enabled=1; CONFIG_MPTCP), or run with --no-client-mptcp "
                               "--no-server-mptcp") from None
    ports = lc.intercept_ports if lc.mode == "transparent" else (lc.port,)
    for port in ports:
        if _listening(lc.addr, port):
            raise StartupError(f"port {port} on {lc.addr} is in use: another program listens there "
                               f"(ss -ltnp 'sport = :{port}'), choose another with --listen")


def _listening(addr: str, port: int) -> bool:
    """Whether something listens on addr:port already, either family (a listener with SO_REUSEPORT
    would let this converter's workers join it silently, so a bind() alone cannot tell)."""
    import ipaddress

    from mimbox.host.netfilter import families_of
    wildcard = addr in ("0.0.0.0", "::")
    want, families = ipaddress.ip_address(addr), families_of(addr)
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, state = cols[1], cols[3]
            if state != "0A":            # TCP_LISTEN
                continue
            a, p = local.split(":")
            if int(p, 16) != port:
                continue
            raw = bytes.fromhex(a)       # /proc prints the address as host-order (little-endian) words
            there = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            if there.version == 6 and there.ipv4_mapped:
                there = there.ipv4_mapped
            if there.is_unspecified and there.version == 6:
                return True              # [::] may take IPv4 too (dual stack): it conflicts with anything
            if there.is_unspecified or wildcard:
                if there.version in families:
                    return True
            elif there == want:
                return True
    return False


def explain(e: BaseException, cfg: Config, worker: int) -> str | None:
    """One line for a worker's start-up failure whose cause is known; None otherwise."""
    lc = cfg.listener
    if isinstance(e, OSError):
        text = str(e)
        if "NFQUEUE" in text and e.errno in (errno.EPERM, errno.EBUSY):
            num = lc.queue_num + worker
            return (f"NFQUEUE {num} (--queue-num {lc.queue_num} + worker {worker}) is taken by another program "
                    f"(another converter?): choose a free range with --queue-num")
        if e.errno == errno.EADDRINUSE:
            return f"port {lc.port} on {lc.addr} is in use: choose another with --listen"
        if e.errno == errno.EADDRNOTAVAIL:
            return f"{lc.addr} is not an address of this host (--listen)"
        if e.errno in (errno.EMFILE, errno.ENFILE):
            return "out of file descriptors while starting: raise the open-file limit (ulimit -n, LimitNOFILE=)"
    if isinstance(e, (ValueError, RuntimeError)):
        return str(e).splitlines()[0] if str(e) else None
    return None


def debug_enabled() -> bool:
    return os.environ.get("MIMBOX_DEBUG") == "1"
