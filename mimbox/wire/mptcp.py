"""MPTCP socket helpers: is a socket really MPTCP, how many subflows, and path-manager set-up."""
from __future__ import annotations

import ctypes
import socket
import struct
import subprocess

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
MPTCP_TCPINFO = 2
TCP_IS_MPTCP = 43
# non-blocking from socket() on (one system call less than socket() + setblocking(False))
NONBLOCKING_STREAM = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


def stream_socket(mptcp: bool, family: int = socket.AF_INET) -> socket.socket:
    """A non-blocking TCP socket of `family`, MPTCP when asked and when the kernel has it (else plain TCP)."""
    if mptcp:
        try:
            return socket.socket(family, NONBLOCKING_STREAM, IPPROTO_MPTCP)
        except OSError:
            pass                  # no MPTCP in this kernel (EPROTONOSUPPORT, EINVAL): plain TCP
    return socket.socket(family, NONBLOCKING_STREAM)


def family_of(addr: str) -> int:
    """The socket family that listens on `addr`: AF_INET6 for an IPv6 address ('::': both families)."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def listening_socket(mptcp: bool, addr: str) -> socket.socket:
    """A non-blocking stream socket to bind to `addr`: IPv6 for an IPv6 address, serving IPv4 too
    (as ::ffff:a.b.c.d) when the address is [::]."""
    s = stream_socket(mptcp, family_of(addr))
    if s.family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if addr == "::" else 1)
    return s


def is_mptcp(sock: socket.socket) -> bool:
    """True when the connection runs MPTCP (False for plain TCP and for MPTCP fallen back to TCP)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP) == 1
    except OSError:
        return False


_libc = ctypes.CDLL(None, use_errno=True)
_SFD = struct.Struct("IIII")   # struct mptcp_subflow_data: size_subflow_data, num_subflows, size_kernel, size_user
_STATE_BYTES = 8               # we read only the head of each tcp_info (tcpi_state is its first byte)
TCP_ESTABLISHED = 1


def subflows(sock: socket.socket | int, max_subflows: int = 8) -> int:
    """Established subflows of an MPTCP connection (1 for TCP or fallback).

    Counts the per-subflow tcp_info states from MPTCP_TCPINFO: MPTCP_INFO's counters include
    subflows still in SYN_SENT (a join the connection may yet lose).
    """
    size = _SFD.size + max_subflows * _STATE_BYTES
    buf = ctypes.create_string_buffer(_SFD.pack(_SFD.size, 0, 0, _STATE_BYTES) + bytes(size - _SFD.size), size)
    optlen = ctypes.c_uint32(size)
    fd = sock if isinstance(sock, int) else sock.fileno()
    if _libc.getsockopt(fd, SOL_MPTCP, MPTCP_TCPINFO, buf, ctypes.byref(optlen)) != 0:
        return 1
    _, n, _, user = _SFD.unpack_from(buf.raw)
    step = user or _STATE_BYTES
    states = [buf.raw[_SFD.size + i * step] for i in range(min(n, max_subflows))]
    return max(1, sum(1 for st in states if st == TCP_ESTABLISHED))


def setup_path_manager(subflows_max: int = 2, add_addr_accepted: int = 2,
                       signal: list[str] = (), subflow: list[tuple[str, str]] = (),
                       netns_cmd: list[str] = (), cluster: str | list[str] | None = None) -> list[str]:
    """Configure the in-kernel path manager with `ip mptcp`; returns the commands it ran.

    signal:  addresses announced to peers (ADD_ADDR), e.g. a converter with several addresses;
    subflow: (address, device) pairs from which this host opens extra subflows itself;
    cluster: this box's own address(es) when it is one of several behind a shared address, at
             most one per family (see cluster_commands).
    """
    own = [cluster] if isinstance(cluster, str) else list(cluster or [])
    if own:
        import ipaddress
        versions = [ipaddress.ip_address(a).version for a in own]   # a clear error for a typo, before anything changes
        if len(set(versions)) != len(versions):
            raise ValueError(f"--cluster: one own address per family, not {', '.join(own)}")
    cmds = [["ip", "mptcp", "limits", "set", "subflow", str(subflows_max),
             "add_addr_accepted", str(add_addr_accepted)]]
    if own:
        cmds += cluster_commands(*own)
    cmds += [["ip", "mptcp", "endpoint", "add", a, "signal"] for a in signal]
    cmds += [["ip", "mptcp", "endpoint", "add", a, "dev", d, "subflow"] for a, d in subflow]
    for c in cmds:
        p = subprocess.run([*netns_cmd, *c], capture_output=True, text=True)
        if p.returncode != 0 and "exists" not in p.stderr:
            raise RuntimeError(f"{' '.join(c)}: {p.stderr.strip()}")
    return [" ".join(c) for c in cmds]


def cluster_commands(*own_addresses: str) -> list[list[str]]:
    """A converter behind a load-balanced address (RFC 8684 §3.1): the C flag, so peers never
    join the shared initial address (the balancer may hash a join to another converter), and an
    ADD_ADDR of this converter's own address (one per family: the kernel announces to each
    connection those of its family), where its peers' joins go instead."""
    return [["sysctl", "-qw", "net.mptcp.allow_join_initial_addr_port=0"],
            *(["ip", "mptcp", "endpoint", "add", a, "signal"] for a in own_addresses)]
