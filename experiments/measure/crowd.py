"""A crowd of mostly idle connections (experiments/concurrency.py): phones holding push channels.

Each held connection sends a 64-byte keep-alive every `interval` seconds (phases spread evenly) and
waits for its echo; a trickle of new connections each sends one 1 KB request and waits for its echo,
then closes. One process holds at most PER_PROCESS connections (this machine's fd limit is 20,000 a
process): the crowd is split over several, and so is the echo server (SO_REUSEPORT).

    python -m experiments.measure.crowd server PORT [--procs K] [--mptcp]
        prints "ready"; echoes until SIGTERM
    python -m experiments.measure.crowd client HOST PORT N [--procs K] [--open-rate R] [--tcp]
                                                  [--source ADDR ...]
        prints {"started": K} once its K processes run; then takes commands on stdin, one per line:
          open                                opens the N connections (paced): {"open": n, "failed": {...},
                                              "seconds": s}
          measure SECONDS INTERVAL NEW_RATE   keep-alives and new requests for SECONDS: one JSON line
                                              (latencies in µs, counts, errors)
        and closes everything when stdin closes.
"""
from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import random
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time

from mimbox.host.resources import IP_BIND_ADDRESS_NO_PORT
from mimbox.wire.mptcp import IPPROTO_MPTCP

PER_PROCESS = 9000
KEEPALIVE = 64
REQUEST = 1024
CONNECTING_AT_ONCE = 256


def _nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the echo server --------------------------------------------------------------------------------------
def serve(port: int, mptcp: bool) -> None:
    """One process of the echo server: accept everything, send back what comes."""
    _nofile()
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP if mptcp else 0)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            s = key.fileobj
            if s is ls:
                for _ in range(64):
                    try:
                        c, _ = ls.accept()
                    except BlockingIOError:
                        break
                    except OSError as e:       # EMFILE: the others go on
                        print(f"accept: {e}", file=sys.stderr, flush=True)
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
                continue
            try:
                s.sendall(data)            # (small echoes: the socket's buffer takes them)
            except OSError:
                sel.unregister(s)
                s.close()


# -- one client process ---------------------------------------------------------------------------------
class Crowd:
    """n connections of one process, and what happens to them."""

    def __init__(self, host: str, port: int, n: int, open_rate: float, mptcp: bool, source: str | None = None):
        self.addr, self.n, self.open_rate, self.source = (host, port), n, open_rate, source
        self.proto = IPPROTO_MPTCP if mptcp else 0
        self.sel = selectors.DefaultSelector()
        self.held: list[socket.socket] = []
        self.failed: dict[str, int] = {}

    def _fail(self, err: int) -> None:
        name = errno.errorcode.get(err, str(err))
        self.failed[name] = self.failed.get(name, 0) + 1

    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, self.proto)
        s.setblocking(False)
        if self.source:         # (one address has ~30,000 ports towards one server port: a crowd needs several)
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((self.source, 0))
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self._fail(err)
            s.close()
            return None
        return s

    def open(self) -> dict:
        """Open the crowd at `open_rate` a second, at most CONNECTING_AT_ONCE in progress."""
        t0, started, pending = time.monotonic(), 0, 0
        while started < self.n or pending:
            due = self.n if self.open_rate <= 0 else min(self.n, int((time.monotonic() - t0) * self.open_rate) + 1)
            while started < due and pending < CONNECTING_AT_ONCE:
                started += 1
                s = self._connect()
                if s is not None:
                    self.sel.register(s, selectors.EVENT_WRITE)
                    pending += 1
            for key, _ in self.sel.select(0.01):
                s = key.fileobj
                self.sel.unregister(s)
                pending -= 1
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self._fail(err)
                    s.close()
                else:
                    self.held.append(s)
        return {"open": len(self.held), "failed": dict(self.failed), "seconds": round(time.monotonic() - t0, 2)}

    def measure(self, seconds: float, interval: float, new_rate: float) -> dict:
        """Keep-alives on every held connection and new 1 KB requests at new_rate a second."""
        t0 = time.monotonic()
        end = t0 + seconds
        n = len(self.held)
        # (when, kind, index): kind 0 keep-alive of held[index], 1 a new request
        due = [(t0 + interval * i / max(n, 1), 0, i) for i in range(n)]
        if new_rate > 0:
            due += [(t0 + random.random() / new_rate, 1, -1)]
        heapq.heapify(due)
        sent_at: dict[int, float] = {}         # fd -> when its keep-alive left
        got: dict[int, int] = {}
        fresh: dict[int, list] = {}            # fd -> [socket, started, bytes back]
        ka, new, errors = [], [], {}
        sel = self.sel
        for i, s in enumerate(self.held):
            sel.register(s, selectors.EVENT_READ, i)

        def error(what: str) -> None:
            errors[what] = errors.get(what, 0) + 1
        while True:
            now = time.monotonic()
            while due and due[0][0] <= now:
                when, kind, i = heapq.heappop(due)
                if when >= end:
                    due = []
                    break
                if kind == 0:
                    s = self.held[i]
                    if s.fileno() < 0:
                        continue
                    try:
                        s.send(b"k" * KEEPALIVE)
                        sent_at[s.fileno()], got[s.fileno()] = now, 0
                    except OSError as e:
                        error(f"keep-alive send: {errno.errorcode.get(e.errno, e.errno)}")
                    heapq.heappush(due, (when + interval, 0, i))
                else:
                    before = dict(self.failed)
                    s = self._connect()
                    if s is None:
                        error("new connect: " + next((k for k, v in self.failed.items() if v != before.get(k)), "?"))
                    else:
                        fresh[s.fileno()] = [s, now, 0]
                        sel.register(s, selectors.EVENT_WRITE, -1)
                    heapq.heappush(due, (when + random.expovariate(new_rate), 1, -1))
            if (not due or time.monotonic() >= end) and not sent_at and not fresh:
                break                             # (what is due after the window is not sent)
            if time.monotonic() > end + 5:        # answers still missing 5 s after the window
                for _ in range(len(sent_at) + len(fresh)):
                    error("no answer within 5 s")
                break
            wait = max(0.0, min(due[0][0] - time.monotonic(), 0.05)) if due else 0.05
            for key, ev in sel.select(wait):
                s, now = key.fileobj, time.monotonic()
                fd = s.fileno()
                if key.data == -1:                 # a new request's socket
                    entry = fresh[fd]
                    if ev & selectors.EVENT_WRITE:
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            error(f"new connect: {errno.errorcode.get(err, err)}")
                            sel.unregister(s)
                            del fresh[fd]
                            s.close()
                            continue
                        try:
                            s.send(b"r" * REQUEST)
                        except OSError as e:
                            error(f"new send: {errno.errorcode.get(e.errno, e.errno)}")
                        sel.modify(s, selectors.EVENT_READ, -1)
                        continue
                    try:
                        data = s.recv(65536)
                    except OSError:
                        data = b""
                    entry[2] += len(data)
                    if not data or entry[2] >= REQUEST:
                        if entry[2] >= REQUEST:
                            new.append(int((now - entry[1]) * 1e6))
                        else:
                            error("new: closed early")
                        sel.unregister(s)
                        del fresh[fd]
                        s.close()
                    continue
                try:
                    data = s.recv(65536)
                except OSError as e:
                    error(f"keep-alive recv: {errno.errorcode.get(e.errno, e.errno)}")
                    data = None
                if not data:
                    if data is not None:
                        error("keep-alive: closed")
                    sel.unregister(s)
                    sent_at.pop(fd, None)
                    s.close()
                    continue
                got[fd] = got.get(fd, 0) + len(data)
                if fd in sent_at and got[fd] >= KEEPALIVE:
                    ka.append(int((now - sent_at.pop(fd)) * 1e6))
        for s, _, _ in fresh.values():            # (unanswered: closed, never left for the next window)
            sel.unregister(s)
            s.close()
        for s in self.held:
            if s.fileno() >= 0:
                sel.unregister(s)
        self.held = [s for s in self.held if s.fileno() >= 0]
        return {"keepalive_us": ka, "new_us": new, "errors": errors, "held": len(self.held),
                "seconds": round(time.monotonic() - t0, 2)}


def client_part(host: str, port: int, n: int, open_rate: float, mptcp: bool, source: str | None) -> None:
    """One client process: open, then follow the parent's commands."""
    _nofile()
    crowd = Crowd(host, port, n, open_rate, mptcp, source)
    print(json.dumps({"started": 1}), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        try:
            if cmd and cmd[0] == "open":
                out = crowd.open()
            elif cmd and cmd[0] == "measure":
                out = crowd.measure(float(cmd[1]), float(cmd[2]), float(cmd[3]))
            else:
                continue
        except Exception as e:       # said, counted as an error of the run, never a silent hole
            import traceback
            traceback.print_exc()
            out = {"errors": {f"crowd: {type(e).__name__}: {e}"[:200]: 1}}
        print(json.dumps(out), flush=True)
    for s in crowd.held:
        s.close()


# -- the parent: several processes as one -----------------------------------------------------------------
def merge(parts: list[dict]) -> dict:
    out: dict = {}
    for p in parts:
        for k, v in p.items():
            if isinstance(v, list):
                out.setdefault(k, []).extend(v)
            elif isinstance(v, dict):
                d = out.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            elif k == "seconds":
                out[k] = max(out.get(k, 0), v)
            else:
                out[k] = out.get(k, 0) + v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("port", type=int)
    s.add_argument("--procs", type=int, default=1)
    s.add_argument("--mptcp", action="store_true")
    c = sub.add_parser("client")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("n", type=int)
    c.add_argument("--procs", type=int, default=0, help="default: N / PER_PROCESS, rounded up")
    c.add_argument("--open-rate", type=float, default=2000, help="new connections a second, all processes")
    c.add_argument("--tcp", action="store_true", help="plain TCP sockets (default MPTCP)")
    c.add_argument("--source", action="append", default=[], help="source addresses, one per process in turn")
    c.add_argument("--part", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    me = [sys.executable, "-m", "experiments.measure.crowd"]
    if a.role == "server":
        if a.procs <= 1:
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            serve(a.port, a.mptcp)
            return 0
        kids = [subprocess.Popen([*me, "server", str(a.port), *(["--mptcp"] if a.mptcp else [])],
                                 stdout=subprocess.PIPE, text=True) for _ in range(a.procs)]
        signal.signal(signal.SIGTERM, lambda *_: [k.terminate() for k in kids] and sys.exit(0))
        for k in kids:
            if k.stdout.readline().strip() != "ready":
                raise SystemExit("an echo server process did not start")
        print("ready", flush=True)
        for k in kids:
            k.wait()
        return 0
    if a.part:
        client_part(a.host, a.port, a.n, a.open_rate, not a.tcp, a.source[0] if a.source else None)
        return 0
    procs = a.procs or max(1, -(-a.n // PER_PROCESS))
    sizes = [a.n // procs + (i < a.n % procs) for i in range(procs)]
    kids = [subprocess.Popen([*me, "client", a.host, str(a.port), str(k), "--part", "--open-rate",
                              str(a.open_rate / procs), *(["--tcp"] if a.tcp else []),
                              *(["--source", a.source[i % len(a.source)]] if a.source else [])],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for i, k in enumerate(sizes)]
    def answers() -> dict:
        return merge([json.loads(k.stdout.readline() or '{"errors": {"a crowd process exited": 1}}') for k in kids])
    print(json.dumps(answers()), flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd and cmd[0] == "measure" and len(cmd) == 4:      # NEW_RATE is the crowd's: each process a share
            line = f"measure {cmd[1]} {cmd[2]} {float(cmd[3]) / procs}\n"
        for k in kids:
            try:
                k.stdin.write(line)
                k.stdin.flush()
            except BrokenPipeError:
                pass                  # (its answer says it exited)
        print(json.dumps(answers()), flush=True)
    for k in kids:
        k.stdin.close()
    for k in kids:
        k.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
