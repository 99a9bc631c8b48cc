"""The paper's two minimal user-space converters (§4.1): listen on a port, accept, then connect to
a hard-coded server, and move bytes with read()/write() or with splice(). Deliberately plain:
the server connection starts only after accept() (so the SYN waits for the client's handshake,
Table 1), one event loop, MPTCP listening socket so MPTCP clients can use it.

    python -m experiments.systems.naive --engine readwrite --listen 7001 --upstream 10.0.101.1:5201
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys

from mimbox.wire.mptcp import IPPROTO_MPTCP

CHUNK = 64 << 10


def serve(listen_port: int, upstream: tuple[str, int], engine: str) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", listen_port))
    ls.listen(1024)
    ep = select.epoll()
    ep.register(ls.fileno(), select.EPOLLIN)
    # fd -> (its socket, the other socket, the pipe of this direction, the other direction's pipe)
    peer: dict[int, tuple] = {}
    print("ready", flush=True)
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))

    def close(fd: int) -> None:
        """Either side's EOF or error ends both sides and both directions' pipes."""
        a, b, pipe, other_pipe = peer.pop(fd)
        peer.pop(b.fileno(), None)
        for s in (a, b):
            try:
                ep.unregister(s.fileno())
            except (OSError, ValueError):
                pass
            s.close()
        for p in (pipe, other_pipe):
            if p:
                os.close(p[0])
                os.close(p[1])

    while running[0]:
        for fd, _ in ep.poll(1.0):
            if fd == ls.fileno():
                try:
                    c, _ = ls.accept()
                except OSError as e:    # e.g. EMFILE: say so, keep serving the others
                    print(f"accept: {e}", file=sys.stderr, flush=True)
                    continue
                try:
                    s = socket.create_connection(upstream)      # blocking connect, after accept()
                except OSError:
                    c.close()
                    continue
                for x in (c, s):
                    x.setblocking(True)
                    x.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                p1 = os.pipe() if engine == "splice" else None
                p2 = os.pipe() if engine == "splice" else None
                peer[c.fileno()] = (c, s, p1, p2)
                peer[s.fileno()] = (s, c, p2, p1)
                ep.register(c.fileno(), select.EPOLLIN)
                ep.register(s.fileno(), select.EPOLLIN)
                continue
            if fd not in peer:
                continue
            src, dst, pipe, _ = peer[fd]
            try:
                if engine == "splice":
                    n = os.splice(src.fileno(), pipe[1], CHUNK, flags=1)
                    left = n
                    while left:
                        left -= os.splice(pipe[0], dst.fileno(), left, flags=1)
                else:
                    data = os.read(src.fileno(), CHUNK)
                    n = len(data)
                    view = memoryview(data)
                    while view:
                        view = view[os.write(dst.fileno(), view):]
            except OSError:
                n = 0
            if n == 0:
                close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=("readwrite", "splice"), required=True)
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", required=True)
    a = ap.parse_args(argv)
    host, port = a.upstream.rsplit(":", 1)
    serve(a.listen, (host, int(port)), a.engine)
    return 0


if __name__ == "__main__":
    sys.exit(main())
