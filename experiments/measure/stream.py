"""Fixed-rate application stream (the paper's interactive application): the server sends a
timestamped 125-byte message every 10 ms (100 kbit/s); the client reports the application-level
delay of each message (receive time - send time; one machine, one clock).

    server:  python -m experiments.measure.stream server --port 9600 [--mptcp] --seconds 20
    client:  python -m experiments.measure.stream client HOST PORT [--mptcp]
"""
from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time

from mimbox.wire.mptcp import IPPROTO_MPTCP

MSG = 125
HEAD = struct.Struct("!dI")   # send time (CLOCK_REALTIME), sequence number


def serve(port: int, mptcp: bool, seconds: float, rate_bps: int) -> None:
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4)
    print("ready", flush=True)
    c, _ = ls.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    period = MSG * 8 / rate_bps
    pad = bytes(MSG - HEAD.size)
    start = time.monotonic()
    n = int(seconds / period)
    for i in range(n):
        delay = start + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        c.sendall(HEAD.pack(time.time(), i) + pad)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)
    c.close()


def client(host: str, port: int, mptcp: bool) -> dict:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    s.connect((host, port))
    buf = b""
    delays = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        now = time.time()
        buf += chunk
        while len(buf) >= MSG:
            sent, _ = HEAD.unpack_from(buf)
            delays.append((now - sent) * 1e3)
            buf = buf[MSG:]
    s.close()
    delays.sort()
    return {"messages": len(delays), "mean_ms": sum(delays) / len(delays), "max_ms": delays[-1],
            "p99_ms": delays[int(0.99 * (len(delays) - 1))], "median_ms": delays[len(delays) // 2],
            "over_100ms": sum(d > 100 for d in delays), "over_200ms": sum(d > 200 for d in delays)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="fixed-rate stream with per-message delay")
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--mptcp", action="store_true")
    s.add_argument("--seconds", type=float, default=20)
    s.add_argument("--rate", type=int, default=100_000, help="bit/s")
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--mptcp", action="store_true")
    a = ap.parse_args(argv)
    if a.role == "server":
        serve(a.port, a.mptcp, a.seconds, a.rate)
    else:
        print(json.dumps(client(a.host, a.port, a.mptcp)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
