"""The sockets a worker opens: its listeners (by mode: transparent, convert's TFO; the client-side
buffers every accepted socket inherits), the health port's, and the netlink socket the core lists
this host's own destinations on."""
from __future__ import annotations

import logging
import socket
import struct

from mimbox.config import Config
from mimbox.converter import convert as converting
from mimbox.wire import mptcp

log = logging.getLogger("mimbox")

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75


def listener(cfg: Config, port: int, workers: int) -> socket.socket:
    """A listening socket on `port` as the configuration asks (MPTCP or not, its options inherited by
    every accepted socket; SO_REUSEPORT when there are several workers: one listener each)."""
    lc, bc = cfg.listener, cfg.buffers
    ls = mptcp.listening_socket(lc.client_mptcp, lc.addr)
    try:
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # inherited by accepted sockets
        if workers > 1:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if lc.mode == "transparent":
            ls.setsockopt(*((socket.SOL_IP, IP_TRANSPARENT) if ls.family == socket.AF_INET
                            else (socket.IPPROTO_IPV6, IPV6_TRANSPARENT)), 1)
        if lc.mode == "convert":
            converting.prepare_listener(ls, lc.backlog)
        for opt, val in ((socket.SO_RCVBUF, bc.client_rcvbuf), (socket.SO_SNDBUF, bc.client_sndbuf)):
            if val:
                ls.setsockopt(socket.SOL_SOCKET, opt, val)  # inherited by accepted sockets
        ls.bind((lc.addr, port))
        ls.listen(lc.backlog)
    except BaseException:
        ls.close()
        raise
    return ls


def health_listener(cfg: Config) -> socket.socket:
    """The health port's listener (plain TCP), where clients reach the converter; every worker answers."""
    lc = cfg.listener
    hs = mptcp.listening_socket(False, lc.addr)
    try:
        hs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        hs.bind((lc.addr, lc.health_port))      # where clients reach it, not every address
        hs.listen(64)
    except BaseException:
        hs.close()
        raise
    return hs


def answer_health(hs: socket.socket) -> None:
    """Health probes: the handshake completed, which is the answer; each closed at once."""
    try:
        while True:
            hs.accept()[0].close()
    except (BlockingIOError, InterruptedError):
        pass
    except OSError as e:
        log.debug("health probe: %s", e)


def route_dump_socket() -> socket.socket:
    """A NETLINK_ROUTE socket for the core's dumps of the local table (native/core/own.c): blocking,
    with a receive timeout (a dump that never ends fails, and the core refuses every destination),
    the kernel filtering the dump by table (NETLINK_GET_STRICT_CHK)."""
    SOL_NETLINK, NETLINK_GET_STRICT_CHK = 270, 12
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 2, 0))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        s.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
    except OSError:
        pass                  # an older kernel dumps every table: the core keeps the local one only
    s.bind((0, 0))
    return s
