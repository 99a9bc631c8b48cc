"""MPTCP socket helpers: is a socket really MPTCP, how many subflows, and path-manager set-up."""
from __future__ import annotations

import socket
import struct
import subprocess

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
TCP_IS_MPTCP = 43
# struct mptcp_info (include/uapi/linux/mptcp.h): mptcpi_subflows at 0, mptcpi_subflows_total at 80.
_INFO_LEN = 81


def stream_socket(mptcp: bool) -> socket.socket:
    """A non-blocking TCP socket, MPTCP when asked and when the kernel has it (else plain TCP)."""
    if mptcp:
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            s.setblocking(False)
            return s
        except OSError:
            pass
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    return s


def is_mptcp(sock: socket.socket) -> bool:
    """True when the connection runs MPTCP (False for plain TCP and for MPTCP fallen back to TCP)."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_IS_MPTCP) == 1
    except OSError:
        return False


def subflows(sock: socket.socket) -> int:
    """Number of subflows of an MPTCP connection (1 for TCP or fallback)."""
    try:
        raw = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, _INFO_LEN)
    except OSError:
        return 1
    if len(raw) > 80 and raw[80]:
        return raw[80]            # mptcpi_subflows_total counts the initial subflow too
    return (raw[0] + 1) if raw else 1  # older kernels: additional subflows only


def setup_path_manager(subflows_max: int = 2, add_addr_accepted: int = 2,
                       signal: list[str] = (), subflow: list[tuple[str, str]] = (),
                       netns_cmd: list[str] = ()) -> list[str]:
    """Configure the in-kernel path manager with `ip mptcp`; returns the commands it ran.

    signal:  addresses announced to peers (ADD_ADDR), e.g. a converter with several addresses;
    subflow: (address, device) pairs from which this host opens extra subflows itself.
    """
    cmds = [["ip", "mptcp", "limits", "set", "subflow", str(subflows_max),
             "add_addr_accepted", str(add_addr_accepted)]]
    cmds += [["ip", "mptcp", "endpoint", "add", a, "signal"] for a in signal]
    cmds += [["ip", "mptcp", "endpoint", "add", a, "dev", d, "subflow"] for a, d in subflow]
    for c in cmds:
        p = subprocess.run([*netns_cmd, *c], capture_output=True, text=True)
        if p.returncode != 0 and "exists" not in p.stderr:
            raise RuntimeError(f"{' '.join(c)}: {p.stderr.strip()}")
    return [" ".join(c) for c in cmds]
