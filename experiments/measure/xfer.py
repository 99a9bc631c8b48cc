"""Byte-exact transfer tool: deterministic data both ways, SHA-256 on each end, JSON report.

    server:  python -m experiments.measure.xfer server --port 9000 [--mptcp] [--count N]
    client:  python -m experiments.measure.xfer client HOST PORT --up BYTES --down BYTES
                 [--order both|client-first|server-first] [--mptcp] [--seed S]

The client opens with a 20-byte header (magic, download size, order, seed), the server answers
one byte (so an MPTCP connection is fully established and may open subflows); then the payload.
order: both          upload and download at the same time;
       client-first  the client uploads and half-closes, the server sends only after that EOF;
       server-first  the server downloads and half-closes, the client uploads only after that EOF.
Each end prints one JSON line per connection (bytes, sha256 of what it sent and received, whether
the socket ran MPTCP and with how many subflows), so a test compares hashes across the converter.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import struct
import sys
import threading
import time

from mimbox.wire.mptcp import IPPROTO_MPTCP, is_mptcp, subflows
from topologies.support import NotWithin, wait_until

MAGIC = b"MBX1"
HEADER = struct.Struct("!4sQHxxI")   # magic, download bytes, order, seed  (20 bytes)
ORDERS = {"both": 0, "client-first": 1, "server-first": 2}
CHUNK = 64 << 10


def stream(nbytes: int, seed: int):
    """Deterministic pseudo-random chunks totalling nbytes."""
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        n = min(CHUNK, left)
        yield rng.randbytes(n)
        left -= n


def send_all(sock: socket.socket, nbytes: int, seed: int, h) -> int:
    sent = 0
    for chunk in stream(nbytes, seed):
        sock.sendall(chunk)
        h.update(chunk)
        sent += len(chunk)
    return sent


def recv_all(sock: socket.socket, h) -> int:
    got = 0
    while True:
        b = sock.recv(CHUNK)
        if not b:
            return got
        h.update(b)
        got += len(b)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        b = sock.recv(n - len(buf))
        if not b:
            raise ConnectionError("connection closed inside the header")
        buf += b
    return buf


def _mk(mptcp: bool, host: str = "0.0.0.0") -> socket.socket:
    """A TCP or MPTCP socket of `host`'s family (an IPv6 listener on `::` serves IPv4 too)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return s


def _peer(addr) -> str:
    return "[%s]:%d" % addr[:2] if ":" in addr[0] else "%s:%d" % addr


def exchange(sock: socket.socket, send_bytes: int, send_seed: int, first: str, me: str) -> dict:
    """Send and receive per `first` ('both', or which side sends and half-closes first)."""
    hs, hr = hashlib.sha256(), hashlib.sha256()
    out = {}

    def do_send():
        out["sent"] = send_all(sock, send_bytes, send_seed, hs)
        sock.shutdown(socket.SHUT_WR)

    def do_recv():
        out["received"] = recv_all(sock, hr)

    if first == "both":
        t = threading.Thread(target=do_send)
        t.start()
        do_recv()
        t.join()
    elif first == me:
        do_send()
        do_recv()
    else:
        do_recv()
        do_send()
    out.update(sha_sent=hs.hexdigest(), sha_received=hr.hexdigest(), mptcp=is_mptcp(sock),
               subflows=subflows(sock))
    return out


def serve(port: int, mptcp: bool, count: int, bind: str = "0.0.0.0", want_subflows: int = 0) -> None:
    ls = _mk(mptcp, bind)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, port))
    ls.listen(64)
    print(json.dumps({"listening": port}), flush=True)

    def handle(c: socket.socket, addr):
        try:
            magic, down, order, seed = HEADER.unpack(recv_exact(c, HEADER.size))
            if magic != MAGIC:
                raise ValueError("bad magic")
            first = {0: "both", 1: "client", 2: "server"}[order]
            c.sendall(b"K")   # data from the server makes the MPTCP connection fully established
            seen = wait_subflows(c, want_subflows, 3.0) if want_subflows else 1
            r = exchange(c, down, seed + 1, first, "server")
            r["subflows"] = max(seen, r["subflows"])
            r["peer"] = _peer(addr)
            r["seed"] = seed
        except Exception as e:  # noqa: BLE001 - reported, the server keeps serving
            r = {"error": repr(e), "peer": _peer(addr)}
        finally:
            c.close()
        with printing:      # one whole line per connection, whichever thread finishes first
            print(json.dumps(r), flush=True)

    threads, printing = [], threading.Lock()
    for _ in range(count):
        c, addr = ls.accept()
        t = threading.Thread(target=handle, args=(c, addr))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


def wait_subflows(s: socket.socket, n: int, timeout: float) -> int:
    """Wait until the connection has n subflows (or timeout); return the count seen."""
    try:
        wait_until(lambda: subflows(s) >= n, timeout, f"{n} subflows", every=0.01)
    except NotWithin:
        pass                  # the caller reports the count it got
    return subflows(s)


def client(host: str, port: int, up: int, down: int, order: str, mptcp: bool, seed: int,
           want_subflows: int = 0) -> dict:
    s = _mk(mptcp, host)
    t0 = time.monotonic()
    s.connect((host, port))
    local = s.getsockname()[0]      # its family is the one the connection really has (after redirects)
    s.sendall(HEADER.pack(MAGIC, down, ORDERS[order], seed))
    if recv_exact(s, 1) != b"K":
        raise ConnectionError("bad server greeting")
    seen = wait_subflows(s, want_subflows, 3.0) if want_subflows else 1
    first = {"both": "both", "client-first": "client", "server-first": "server"}[order]
    r = exchange(s, up, seed, first, "client")
    r["subflows"] = max(seen, r["subflows"])  # the most seen: subflows close as the connection ends
    r["local"] = local
    s.close()
    r["elapsed"] = time.monotonic() - t0
    # what the other end must have seen, for the comparison
    r["expected_server_sha"] = hashlib.sha256(b"".join(stream(down, seed + 1))).hexdigest()
    return r


def many(a) -> int:
    """`--connections N`: N clients, `--parallel` at a time; 1 if any of them failed."""
    from concurrent.futures import ThreadPoolExecutor
    lock = threading.Lock()
    failed = 0

    def one(i: int) -> None:
        nonlocal failed
        seed = a.seed + i
        try:
            r = client(a.host, a.port, a.up, a.down, a.order, a.mptcp, seed, a.wait_subflows)
        except OSError as e:
            r = {"error": repr(e), "errno": e.errno}
        r["seed"] = seed
        with lock:
            failed += "error" in r
            print(json.dumps(r), flush=True)

    with ThreadPoolExecutor(max_workers=a.parallel) as pool:
        list(pool.map(one, range(a.connections)))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="byte-exact transfer tool")
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bind", default="0.0.0.0", help="address to listen on (:: serves both families)")
    s.add_argument("--mptcp", action="store_true")
    s.add_argument("--count", type=int, default=1)
    s.add_argument("--wait-subflows", type=int, default=0, help="wait (up to 3 s) for this many subflows first")
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--up", type=int, default=0)
    c.add_argument("--down", type=int, default=0)
    c.add_argument("--order", choices=list(ORDERS), default="both")
    c.add_argument("--mptcp", action="store_true")
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--wait-subflows", type=int, default=0, help="wait (up to 3 s) for this many subflows first")
    c.add_argument("--connections", type=int, default=0,
                   help="open this many connections (seeds SEED, SEED+1, ...), --parallel at a time; one JSON "
                        "line each")
    c.add_argument("--parallel", type=int, default=10)
    a = ap.parse_args(argv)
    if a.role == "server":
        serve(a.port, a.mptcp, a.count, a.bind, a.wait_subflows)
    elif a.connections:
        return many(a)
    else:
        try:
            r = client(a.host, a.port, a.up, a.down, a.order, a.mptcp, a.seed, a.wait_subflows)
        except OSError as e:
            r = {"error": repr(e), "errno": e.errno}
            print(json.dumps(r), flush=True)
            return 1
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
