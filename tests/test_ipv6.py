"""The converter over IPv6 and across families, for real: `mimbox run` in one network namespace, the
servers in another (a veth between them, both families on it), clients in the converter's namespace.

    converter ns  fd00:96::1/64  10.96.0.1/24  --veth--  fd00:96::2/64  10.96.0.2/24  server ns
                                                         echo servers: [::]:PORT (both), 0.0.0.0:PORT4

A listener on [::] serves IPv6 and IPv4 clients; the server side follows the server's family; the SYN
path holds IPv6 SYNs from ip6tables' NFQUEUE as IPv4 ones from iptables'; convert mode serves IPv6
Connects and refuses what the policy denies in either family."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from helpers import free_port, free_queues, wait_until
from mimbox import rfc8803

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB6, MB4, SRV6, SRV4 = "fd00:96::1", "10.96.0.1", "fd00:96::2", "10.96.0.2"

ECHO = """
import socket, sys, threading
fam, addr, port = (socket.AF_INET6, '::', int(sys.argv[1])) if sys.argv[2] == '6' else (socket.AF_INET, '0.0.0.0', int(sys.argv[1]))
ls = socket.socket(fam)
if fam == socket.AF_INET6:
    ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((addr, port)); ls.listen(64); print('ready', flush=True)
def serve(s):
    with s:
        while d := s.recv(65536):
            s.sendall(d)
while True:
    threading.Thread(target=serve, args=(ls.accept()[0],), daemon=True).start()
"""

CLIENT = """
import socket, sys
host, port, size, convert = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
data = bytes(range(256)) * (size // 256)
s = socket.create_connection((host, port), timeout=10)
if convert:
    sys.path.insert(0, %r)
    from mimbox import rfc8803
    s.sendall(rfc8803.connect_message(convert[0], int(convert[1])))
s.sendall(data); s.shutdown(socket.SHUT_WR)
buf = b''
while d := s.recv(65536):
    buf += d
if convert:
    r = rfc8803.parse_reply(buf)
    if r.error is not None:
        print('error', int(r.error)); sys.exit(0)
    buf = buf[r.length:]
print('ok' if buf == data else 'corrupt %%d of %%d' %% (len(buf), len(data)))
""" % ROOT


class Pair:
    """Two namespaces and a veth, both families; everything started in them is ended by close()."""

    def __init__(self):
        tag = uuid.uuid4().hex[:6]
        self.mb, self.srv = f"mimbox6-mb-{tag}", f"mimbox6-srv-{tag}"
        self.procs: list[subprocess.Popen] = []
        for ns in (self.mb, self.srv):
            self.sh(None, f"ip netns add {ns}")
        try:
            self.sh(None, f"ip link add v6m{tag} netns {self.mb} type veth peer name v6s{tag} netns {self.srv}")
            for ns, dev, a6, a4 in ((self.mb, f"v6m{tag}", MB6, MB4), (self.srv, f"v6s{tag}", SRV6, SRV4)):
                for cmd in ("ip link set lo up", f"ip link set {dev} up", f"ip addr add {a4}/24 dev {dev}",
                            f"ip addr add {a6}/64 dev {dev} nodad"):
                    self.sh(ns, cmd)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def sh(ns: str | None, cmd: str) -> str:
        full = (["ip", "netns", "exec", ns] if ns else []) + cmd.split()
        p = subprocess.run(full, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, f"{cmd}: {p.stderr}"
        return p.stdout

    def start(self, ns: str, args: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(["ip", "netns", "exec", ns, *args], **kw)
        self.procs.append(p)
        return p

    def client(self, host: str, port: int, size: int = 300_000, convert: tuple[str, int] | None = None) -> str:
        extra = [convert[0], str(convert[1])] if convert else []
        p = subprocess.run(["ip", "netns", "exec", self.mb, PY, "-c", CLIENT, host, str(port), str(size), *extra],
                           capture_output=True, text=True, timeout=30)
        return (p.stdout.strip() or p.stderr.strip().splitlines()[-1]) if (p.stdout or p.stderr) else "nothing"

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        for ns in (self.mb, self.srv):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture
def pair():
    p = Pair()
    try:
        yield p
    finally:
        p.close()


def echo_servers(pair: Pair) -> tuple[int, int]:
    """An echo server on [::] (both families) and one on IPv4 only: their ports."""
    ports = free_port(), free_port()
    for port, fam in zip(ports, "64"):
        e = pair.start(pair.srv, [PY, "-c", ECHO, str(port), fam], stdout=subprocess.PIPE, text=True)
        assert e.stdout.readline().strip() == "ready"
    return ports


def converter(pair: Pair, *args: str) -> tuple[subprocess.Popen, int]:
    port, stats = free_port(), f"/tmp/{pair.mb}.sock"
    m = pair.start(pair.mb, [PY, "-m", "mimbox.cli", "run", "--listen", f"[::]:{port}", "--stats", stats,
                             "--queue-num", str(free_queues(4)), "--allow-client", "fd00:96::/64",
                             "--allow-client", "10.96.0.0/24", "--allow-destination", "fd00:96::/64",
                             "--allow-destination", "10.96.0.0/24", "--log-level", "info", *args],
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    wait_until(lambda: "ready on" in (m.stdout.readline() or "") or m.poll() is not None, 30, "converter ready")
    assert m.poll() is None, "the converter exited"
    return m, port


@pytest.mark.parametrize("server", [SRV6, SRV4], ids=["to-ipv6", "to-ipv4"])
def test_static_mode_both_families_held_syns(pair, server):
    """[::] listener, SYNs held (iptables and ip6tables NFQUEUE), two workers: an IPv6 and an IPv4
    client reach an IPv6 or IPv4 server, bytes exact; every SYN was queued, none refused."""
    six, four = echo_servers(pair)
    upstream = f"[{server}]:{six}" if ":" in server else f"{server}:{four}"
    m, port = converter(pair, "--mode", "static", "--upstream", upstream, "--syn-path", "hold", "--workers", "2")
    for client in (MB6, MB4):
        assert pair.client(client, port) == "ok", (client, server)
    rules6 = pair.sh(pair.mb, "ip6tables -t raw -S")
    assert rules6.count("NFQUEUE") == 2                      # one queue rule per worker, IPv6 too
    stats = __import__("json").loads(subprocess.run(
        ["ip", "netns", "exec", pair.mb, PY, "-m", "mimbox.cli", "stats", "--path", f"/tmp/{pair.mb}.sock"],
        capture_output=True, text=True, timeout=30, cwd=ROOT).stdout)
    assert stats["syns"] == 2 and stats["accepted"] == 2 and not stats["refused"], stats


def test_convert_mode_ipv6_connect_and_policy(pair):
    """Convert mode: IPv6 and IPv4-mapped Connects from clients of either family are served; the
    policy refuses this host's addresses and ::1 in IPv6 as in IPv4 (Error TLV Not Authorized)."""
    six, four = echo_servers(pair)
    m, port = converter(pair, "--mode", "convert")
    assert pair.client(MB6, port, convert=(SRV6, six)) == "ok"
    assert pair.client(MB4, port, convert=(SRV6, six)) == "ok"             # IPv4 client, IPv6 server
    assert pair.client(MB6, port, convert=(f"::ffff:{SRV4}", four)) == "ok"  # IPv6 client, IPv4 server
    for denied in (MB6, "::1", "fe80::1", f"::ffff:{MB4}"):   # (no data: the answer ends the stream)
        assert pair.client(MB6, port, 0, convert=(denied, six)) == f"error {int(rfc8803.Error.NOT_AUTHORIZED)}", denied
