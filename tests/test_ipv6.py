"""The converter over IPv6 and across families, for real: clients, `mimbox run` and servers in three
network namespaces in a line, both families on every link (topologies.netns.NamespaceLine):

    client ns  --  converter ns (forwards)  --  server ns: echo servers on [::]:PORT (both), 0.0.0.0:PORT4

A listener on [::] serves IPv6 and IPv4 clients; the server side follows the server's family; the SYN
path holds IPv6 SYNs from ip6tables' NFQUEUE as IPv4 ones from iptables'; convert mode serves IPv6
Connects and refuses what the policy denies in either family."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from topologies.support import free_port, free_queues, wait_until

from mimbox.wire import rfc8803
from topologies.netns import NamespaceLine

PY = sys.executable
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MB6, MB4 = NamespaceLine.MB_C6, NamespaceLine.MB_C4         # where clients reach the converter
SRV6, SRV4 = NamespaceLine.SERVER6, NamespaceLine.SERVER4

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
    from mimbox.wire import rfc8803
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


class Pair(NamespaceLine):
    """client -- converter -- server namespaces (topologies.netns), with the tests' client program."""

    def client(self, host: str, port: int, size: int = 300_000, convert: tuple[str, int] | None = None,
               via: list[str] | None = None) -> str:
        """Run CLIENT in the client namespace (under `mimbox client` VIA when via is given): its verdict."""
        extra = [convert[0], str(convert[1])] if convert else []
        wrap = [PY, "-m", "mimbox.ops.cli", "client", *via, "--"] if via else []
        p = self.run(self.client_ns, [*wrap, PY, "-c", CLIENT, host, str(port), str(size), *extra], cwd=ROOT)
        return (p.stdout.strip() or p.stderr.strip().splitlines()[-1]) if (p.stdout or p.stderr) else "nothing"


@pytest.fixture
def pair():
    with Pair("mimbox6") as p:
        yield p


def echo_servers(pair: Pair) -> tuple[int, int]:
    """An echo server on [::] (both families) and one on IPv4 only: their ports."""
    ports = free_port(), free_port()
    for port, fam in zip(ports, "64"):
        e = pair.start(pair.server_ns, [PY, "-c", ECHO, str(port), fam], stdout=subprocess.PIPE, text=True)
        assert e.stdout.readline().strip() == "ready"
    return ports


def converter(pair: Pair, *args: str) -> tuple[subprocess.Popen, int]:
    port, stats = free_port(), f"/tmp/{pair.mb_ns}.sock"
    m = pair.start(pair.mb_ns, [PY, "-m", "mimbox.ops.cli", "run", "--listen", f"[::]:{port}", "--stats", stats,
                             "--queue-num", str(free_queues(4)), "--allow-client", "fd00:95::/64",
                             "--allow-client", "10.95.0.0/24", "--allow-destination", "fd00:96::/64",
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
    rules6 = pair.sh(pair.mb_ns, "ip6tables -t raw -S")
    assert rules6.count("NFQUEUE") == 2                      # one queue rule per worker, IPv6 too
    stats = __import__("json").loads(subprocess.run(
        ["ip", "netns", "exec", pair.mb_ns, PY, "-m", "mimbox.ops.cli", "stats", "--path", f"/tmp/{pair.mb_ns}.sock"],
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


@pytest.mark.parametrize("syn_path", ["hold", "accept"])
def test_explicit_mode_ipv6_dstopt(pair, syn_path):
    """Explicit mode: `mimbox client --mptcp` (BPF connect4/connect6 + sock_ops) in the client
    namespace writes DST_OPT in the IPv4 form for an IPv4 or IPv4-mapped destination and in the
    22-byte IPv6 form for an IPv6 one (the client sends SYNs without timestamps: the IPv6 form needs
    the room); the converter reads it from the held SYN (hold: the C parser) or from the BPF recorder
    (accept): both families of client, both of server, bytes exact."""
    six, four = echo_servers(pair)
    pair.sh(pair.client_ns, "sysctl -qw net.ipv4.tcp_timestamps=0")
    m, port = converter(pair, "--mode", "explicit", "--syn-path", syn_path)
    via = ["--via", f"{MB4}:{port}", "--via", f"[{MB6}]:{port}", "--mptcp"]
    # IPv6 to IPv6; IPv4 to IPv4; an IPv6 socket to an IPv4(-mapped) server: IPv6 to the converter, IPv4 on
    for dst, dport in ((SRV6, six), (SRV4, four), (f"::ffff:{SRV4}", four)):
        assert pair.client(dst, dport, via=via) == "ok", (dst, dport)
    # only the IPv4 address given: an IPv6 socket reaches it as ::ffff:MB4, the IPv6 form rides an IPv4 SYN
    assert pair.client(SRV6, six, via=["--via", f"{MB4}:{port}", "--mptcp"]) == "ok"
    # only the IPv6 address given: IPv4 sockets cannot reach it and fail rather than go around it
    assert "Errno 1]" in pair.client(SRV4, four, via=["--via", f"[{MB6}]:{port}"])
    stats = json.loads(pair.run(pair.mb_ns, [PY, "-m", "mimbox.ops.cli", "stats", "--path", f"/tmp/{pair.mb_ns}.sock"],
                                cwd=ROOT).stdout)
    assert stats["accepted"] == 4 and not stats["refused"], stats


def test_explicit_mode_ipv6_needs_room(pair):
    """With timestamps (Linux's default) an MPTCP SYN has 16 bytes of option room: the IPv6 form (22)
    does not fit, the kernel sends the SYN without it, the converter refuses it (RST) and `mimbox
    client` says why and what to do; the IPv4 form still fits."""
    six, four = echo_servers(pair)
    pair.sh(pair.client_ns, "sysctl -qw net.ipv4.tcp_timestamps=1")
    m, port = converter(pair, "--mode", "explicit", "--syn-path", "hold")
    via = ["--via", f"{MB4}:{port}", "--via", f"[{MB6}]:{port}", "--mptcp"]
    out = pair.client(SRV6, six, via=via)
    assert "1 SYN(s) went without DST_OPT" in out and "tcp_timestamps=0" in out, out
    assert pair.client(SRV4, four, via=via) == "ok"


@pytest.mark.parametrize("client", [NamespaceLine.CLIENT6, NamespaceLine.CLIENT4], ids=["from-ipv6", "from-ipv4"])
def test_transparent_mode_ipv6(pair, client):
    """Transparent mode on the path (the converter namespace forwards): a client of either family
    connects straight to the server's address; ip6tables/iptables TPROXY hand its SYN to the converter,
    which connects to that same address (the listener is [::]): bytes exact, and every connection was
    the converter's (counted as accepted: without the IPv6 TPROXY rules it would be routed past it)."""
    six, four = echo_servers(pair)
    m, port = converter(pair, "--mode", "transparent", "--intercept", f"{six},{four}",
                        "--intercept-from", "fd00:95::/64", "--intercept-from", "10.95.0.0/24")
    dst, dport = (SRV6, six) if ":" in client else (SRV4, four)
    assert pair.client(dst, dport) == "ok", (client, dst)
    if ":" not in client:       # IPv4 to the dual-stack server's port too
        assert pair.client(SRV4, six) == "ok"
    stats = json.loads(pair.run(pair.mb_ns, [PY, "-m", "mimbox.ops.cli", "stats", "--path", f"/tmp/{pair.mb_ns}.sock"],
                                cwd=ROOT).stdout)
    assert stats["accepted"] == (1 if ":" in client else 2) and not stats["refused"], stats


def test_convert_client_ipv6(pair):
    """`mimbox client --convert` (native/convertize.c) for IPv6 destinations: an IPv6 socket's Connect
    carries the IPv6 address and goes to the converter's IPv6 address (or to ::ffff: its IPv4 one
    when it has only that); IPv4 destinations as before; bytes exact through the program's own reads."""
    six, four = echo_servers(pair)
    m, port = converter(pair, "--mode", "convert")
    both = ["--convert", "--via", f"{MB4}:{port}", "--via", f"[{MB6}]:{port}"]
    for dst, dport in ((SRV6, six), (SRV4, four), (f"::ffff:{SRV4}", four)):
        assert pair.client(dst, dport, via=both) == "ok", (dst, dport)
    assert pair.client(SRV6, six, via=["--convert", "--via", f"{MB4}:{port}"]) == "ok"   # via ::ffff:MB4
    assert "Errno 1]" in pair.client(SRV4, four, via=["--convert", "--via", f"[{MB6}]:{port}"])
    stats = json.loads(pair.run(pair.mb_ns, [PY, "-m", "mimbox.ops.cli", "stats", "--path", f"/tmp/{pair.mb_ns}.sock"],
                                cwd=ROOT).stdout)
    assert stats["accepted"] == 4 and not stats["refused"], stats


SYNACK_CLIENT = """
import socket, sys
sys.path.insert(0, %r)
from mimbox.wire import rfc8803, dstopt
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(rfc8803.connect_message(sys.argv[3], int(sys.argv[4])) + b'x')
buf = b''
while len(buf) < 4 or len(buf) < buf[1] * 4:
    buf += s.recv(1024)
r = rfc8803.parse_reply(buf)
print(r.error, r.server_options.hex())
""" % ROOT


@pytest.mark.parametrize("server,mss", [(SRV6, 1440), (SRV4, 1460)], ids=["ipv6", "ipv4"])
def test_convert_answer_carries_the_servers_synack_options(pair, server, mss):
    """RFC 8803's Extended TCP Header TLV holds the options of the server's SYN-ACK (read by the sockops
    program of mimbox.host.synack): the server's MSS for a 1500-byte veth (1460 IPv4, 1440 IPv6), SACK
    permitted, timestamps, window scale; it was empty before."""
    six, four = echo_servers(pair)
    m, port = converter(pair, "--mode", "convert")
    p = pair.run(pair.client_ns, [PY, "-c", SYNACK_CLIENT, MB6, str(port), server, str(six if ":" in server else four)])
    error, opts = p.stdout.split()
    assert error == "None", p.stdout + p.stderr
    kinds, i, raw = {}, 0, bytes.fromhex(opts)
    while i < len(raw) and raw[i]:
        if raw[i] == 1:
            i += 1
            continue
        kinds[raw[i]] = raw[i + 2:i + raw[i + 1]]
        i += raw[i + 1]
    assert {2, 3, 4, 8} <= set(kinds), opts                       # MSS, WS, SACK-permitted, timestamps
    assert int.from_bytes(kinds[2], "big") == mss, opts
