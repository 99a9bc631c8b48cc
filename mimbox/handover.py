"""Hand-over between workers: which worker owns an accepted connection, and passing its socket.

With N workers the SYN of a client is held by the worker its source port picks (the queue rules
split by `worker_of_port`), and that worker opened the server connection. The kernel's reuseport
hash, which user space cannot steer on MPTCP listeners, picks the worker that accept()s. If it is
another one, and the SYN really was held (the workers share the set of held SYNs), the accepting
worker passes the client socket over a unix datagram socket (SCM_RIGHTS) to the owner.
"""
from __future__ import annotations

import errno
import socket

from mimbox.netfilter import worker_of_port


def owner_elsewhere(addr: tuple[str, int], worker: int, workers: int, syns_queued: bool, held) -> int | None:
    """The worker that must serve this accepted client, if not `worker`; None to serve it here.
    held: the shared set of held SYNs (None: assume every SYN of another worker's ports was held)."""
    if workers <= 1 or not syns_queued:
        return None
    owner = worker_of_port(addr[1], workers)
    if owner == worker or (held is not None and addr not in held):
        return None
    return owner


def send(link: socket.socket, cs: socket.socket) -> str | None:
    """Pass `cs` over `link`; closes our reference. Returns None, or the error's name (cs is then
    still ours to reset)."""
    try:
        socket.send_fds(link, [b"c"], [cs.fileno()])
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    cs.close()                # the owner has its own reference now
    return None


def receive(link: socket.socket) -> list[tuple[socket.socket, tuple | None]]:
    """Every client socket waiting on `link`, non-blocking, with its peer address (None: the client
    went away on the way)."""
    out = []
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(link, 16, 64)
        except BlockingIOError:
            return out
        for cfd in fds:
            cs = socket.socket(fileno=cfd)
            cs.setblocking(False)
            try:
                out.append((cs, cs.getpeername()))
            except OSError:
                out.append((cs, None))
