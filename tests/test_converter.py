"""The converter, for real: each redirection mode, each direction, byte-exact, in the Fig. 3 testbed."""
from __future__ import annotations

import subprocess

import pytest
from conftest import PY, SERVER_PORT, Server, run_client, transfer
from topologies.support import free_port, wait_until

from experiments.systems import MiMBox

# the server side's ports of this module's own servers (topologies.support allocates them)
WEB_PORT = free_port()

SIZES = [1, 64 << 10, 8 << 20 | 12345]   # 1 byte, 64 KiB, > 8 MB (odd size)


@pytest.fixture(scope="module", params=[(mode, workers) for mode in ("explicit", "transparent", "static", "convert")
                                        for workers in (1, 2)], ids=lambda p: f"{p[0]}-{p[1]}w")
def converter(request, paper_tb):
    mode, workers = request.param
    # MPTCP and TCP servers take turns on one port here: no remembering which one it was
    m = MiMBox(mode=mode, extra=["--workers", str(workers), "--server-mptcp-retry", "0"])
    # convert mode's SYN data is tested in test_convert_mode.py; this matrix moves up to 8 MB over
    # MPTCP, which this kernel stalls (and now and then resets) after SYN data: results/tfo_stall
    m.fastopen = False
    m.start(paper_tb, SERVER_PORT)
    yield m
    m.stop()


@pytest.mark.parametrize("size", SIZES)
def test_mptcp_client_to_tcp_server(paper_tb, converter, size):
    """The paper's main case: MPTCP client, TCP server; every byte compared, both ways at once."""
    c, s = transfer(paper_tb, converter, up=size, down=size * 2 + 1, client_mptcp=True, server_mptcp=False)
    assert c["mptcp"] is True and s["mptcp"] is False


@pytest.mark.parametrize("size", [1, 8 << 20])
def test_tcp_client_to_mptcp_server(paper_tb, converter, size):
    """Vice versa: a plain TCP client reaches an MPTCP server, which sees MPTCP."""
    c, s = transfer(paper_tb, converter, up=size, down=size, client_mptcp=False, server_mptcp=True)
    assert c["mptcp"] is False and s["mptcp"] is True


@pytest.mark.parametrize("order", ["client-first", "server-first"])
def test_half_close_propagates(paper_tb, converter, order):
    """shutdown(SHUT_WR) on one side reaches the other, and the other direction still delivers."""
    transfer(paper_tb, converter, up=300_000, down=500_000, order=order)


def test_two_subflows_each_side(paper_tb, converter):
    """MPTCP is really used: 2 subflows client-side, and 2 server-side towards an MPTCP server."""
    before = converter.stats()
    c, s = transfer(paper_tb, converter, up=1 << 20, down=1 << 20, order="server-first", client_mptcp=True,
                    server_mptcp=True, wait_subflows=2, server_wait_subflows=2)
    assert c["subflows"] == 2, c
    assert s["subflows"] == 2, s
    st = converter.stats()     # this connection, not an earlier test's, counted MPTCP on both sides
    assert st["client_mptcp"] - before["client_mptcp"] == 1 and st["server_mptcp"] - before["server_mptcp"] == 1


def test_server_refusal_gives_rst(paper_tb, converter):
    """Nothing listens on the server port: the client's connect() fails with a reset, not EOF."""
    before = converter.stats()["refused"].get("server refused", 0)
    r = run_client(paper_tb, converter, SERVER_PORT, 10, 10)   # no Server started on it
    assert r.get("errno") == 111, r                     # ECONNREFUSED: the SYN was answered by RST
    assert converter.stats()["refused"].get("server refused", 0) - before == 1, "refusal not counted once"


def test_refused_destination_logged_and_reset(paper_tb):
    """Explicit mode: a destination in the deny list gets RST and a log line."""
    m = MiMBox(mode="explicit", extra=["--deny", f"{paper_tb.server_ip}/32"])
    m.start(paper_tb, SERVER_PORT)
    try:
        srv = Server(paper_tb, SERVER_PORT, mptcp=False)
        try:
            r = run_client(paper_tb, m, SERVER_PORT, 10, 10)
        finally:
            srv.kill()
        assert r.get("errno") == 111, r
    finally:
        m.stop()
    assert "refused" in m.log() and "denied" in m.log(), m.log()[-2000:]


def test_unchanged_curl_through_explicit_converter(paper_tb):
    """`mimbox client -- curl` reaches a web server through the converter, unchanged, over MPTCP."""
    m = MiMBox(mode="explicit")
    m.start(paper_tb, WEB_PORT)
    web = paper_tb.server.popen([PY, "-m", "http.server", str(WEB_PORT), "--directory", "/usr/share/doc/iproute2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from experiments.systems import wait_port
        wait_port(paper_tb.server, WEB_PORT)
        argv = m.client_argv(paper_tb, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{remote_ip}",
                                        f"http://{paper_tb.server_ip}:{WEB_PORT}/"])
        out = paper_tb.client.cmd(" ".join(f"'{a}'" for a in argv))
        assert out.strip().startswith("200"), out
        st = m.stats()
        assert st["accepted"] == 1 and st["client_mptcp"] == 1, st
    finally:
        web.kill()
        web.wait()
        m.stop()


def test_copy_engine_is_byte_exact(paper_tb):
    """The read()/write() engine (for experiments) is as exact as splice."""
    m = MiMBox(mode="static", engine="copy")
    m.start(paper_tb, SERVER_PORT)
    try:
        transfer(paper_tb, m, up=3 << 20, down=5 << 20)
    finally:
        m.stop()


@pytest.mark.parametrize("mode", ["explicit", "convert"])
def test_uring_engine_end_to_end(paper_tb, mode):
    """--engine uring: MPTCP client to TCP server byte-exact both ways with half-close (convert mode's
    answer in front of the first bytes down), and a refused server still reaches the client as a
    refusal (convert mode: the core gives the client back to Python for its Error TLV)."""
    m = MiMBox(mode=mode, engine="uring", extra=["--server-mptcp-retry", "0"])
    m.fastopen = False
    m.start(paper_tb, SERVER_PORT)
    try:
        c, s = transfer(paper_tb, m, up=3 << 20, down=5 << 20 | 7, client_mptcp=True, server_mptcp=False)
        assert c["mptcp"] is True and s["mptcp"] is False
        r = run_client(paper_tb, m, SERVER_PORT, 10, 10)            # nothing listens now
        assert r.get("errno") == 111, r
        st = m.stats()
        assert st["engine"] == "uring" and st["accepted"] >= 1, st
    finally:
        m.stop()


def test_busy_polling_converter_is_exact_and_stops_at_once(paper_tb):
    """--busy-poll: byte-exact, its polling counted, and SIGTERM still stops it at once (a polling core
    is not in epoll_wait to be interrupted: the signal wakes it through a pipe it watches)."""
    import time
    m = MiMBox(mode="static", extra=["--workers", "2", "--busy-poll", "10000000"])
    m.start(paper_tb, SERVER_PORT)
    try:
        for _ in range(3):
            transfer(paper_tb, m, up=200_000, down=300_000)
        assert m.stats()["busy_polls"] > 0
        t0 = time.monotonic()
        m.stop()
        took = time.monotonic() - t0
    finally:
        m.stop()
    assert took < 0.9, f"a busy-polling converter took {took:.2f} s to stop (its sweep is every second)"


def test_rules_removed_after_stop(paper_tb):
    """The converter leaves no netfilter rule behind after SIGTERM."""
    m = MiMBox(mode="transparent")
    m.start(paper_tb, SERVER_PORT)
    assert f"MIMBOX-{m.port}" in paper_tb.mbox.cmd("iptables -t raw -S")
    # each jump matches only what its chain acts on: SYNs (raw), TCP (mangle's TPROXY)
    raw = [r for r in paper_tb.mbox.cmd("iptables -t raw -S PREROUTING").splitlines() if f"MIMBOX-{m.port}" in r]
    assert len(raw) == 1 and "--tcp-flags FIN,SYN,RST,ACK SYN" in raw[0], raw
    mangle = [r for r in paper_tb.mbox.cmd("iptables -t mangle -S PREROUTING").splitlines() if f"MIMBOX-{m.port}" in r]
    assert mangle == [f"-A PREROUTING -p tcp -j MIMBOX-{m.port}"], mangle
    m.stop()
    for table in ("raw", "mangle", "filter"):
        assert f"MIMBOX-{m.port}" not in paper_tb.mbox.cmd(f"iptables -t {table} -S")


def relay_in_turn(tb, m, n: int, up: int, down: int) -> list[dict]:
    """n connections through m one after the other, connection i sending up + i bytes and getting
    down + i back, each byte-exact both ways; the server's reports, in order."""
    srv = Server(tb, SERVER_PORT, mptcp=False, count=n)
    try:
        for i in range(n):
            c = run_client(tb, m, SERVER_PORT, up + i, down + i)
            assert c["received"] == down + i and c["sha_received"] == c["expected_server_sha"], c
        reports = srv.reports()
    finally:
        srv.kill()
    assert [r["received"] for r in reports] == [up + i for i in range(n)]
    return reports


def test_workers_share_the_port_and_hand_over(paper_tb):
    """Two event loops: SYNs split by source port, accepted sockets handed to the SYN's worker; every
    connection byte-exact, counters summed over both workers, and a dead worker stops the converter
    with its rules removed (a service manager then restarts it)."""
    import os
    import signal
    import time

    from mimbox.converter.stats import query, worker_stats_path
    m = MiMBox(mode="static", extra=["--workers", "2"])
    m.start(paper_tb, SERVER_PORT)
    try:
        reports = relay_in_turn(paper_tb, m, 24, 1000, 70_000)
        st = m.stats()
        assert st["workers"] == 2 and st["accepted"] == st["closed"] == 24, st
        assert st["bytes_down"] == sum(70_000 + i + 1 for i in range(24)), st   # +1: xfer's greeting byte
        assert st["handed_over"] > 0, "the reuseport hash never picked the other worker in 24 connections"
        per_worker = [query(worker_stats_path(m.stats_path, w))["accepted"] for w in range(2)]
        assert sum(per_worker) == 24 and min(per_worker) > 0, per_worker
        worker_pid = int(paper_tb.mbox.cmd(f"pgrep -P {m.proc.pid}").split()[0])
        os.kill(worker_pid, signal.SIGKILL)
        m.proc.wait(timeout=15)
        assert m.proc.returncode == 1
        wait_until(lambda: all(f"MIMBOX-{m.port}" not in paper_tb.mbox.cmd(f"iptables -t {table} -S")
                               for table in ("raw", "filter")), 5, "the supervisor removed its rules")
        wait_until(lambda: not os.path.exists(m.stats_path), 5, "the stats socket removed")
    finally:
        m.stop()
    assert "exited" in m.log(), m.log()[-2000:]


def test_source_addresses_take_turns(paper_tb):
    """--source-address: server connections come from the given addresses in turn (each has its own
    local ports towards the one upstream: static mode past one port range), byte-exact; an address
    that is not the host's stops the start, named."""
    a = paper_tb.topo.server_addrs[0]
    sources = [f"10.0.{a.n}.41", f"10.0.{a.n}.42"]
    for s in sources:
        paper_tb.mbox.cmd(f"ip addr add {s}/24 dev {a.intf_mbox}")
    try:
        m = MiMBox(mode="static", extra=["--workers", "1", *(f"--source-address={s}" for s in sources)])
        m.start(paper_tb, SERVER_PORT)
        try:
            reports = relay_in_turn(paper_tb, m, 6, 2000, 30_000)
            peers = [r["peer"].rsplit(":", 1)[0].strip("[]") for r in reports]
            assert peers == [sources[i % 2] for i in range(6)], peers
        finally:
            m.stop()
        bad = MiMBox(mode="static", extra=["--workers", "1", "--source-address=192.0.2.99"])
        with pytest.raises(Exception):
            bad.start(paper_tb, SERVER_PORT)
        bad.stop()
        assert "source address 192.0.2.99: not an address of this host" in bad.log(), bad.log()[-1500:]
    finally:
        for s in sources:
            paper_tb.mbox.cmd(f"ip addr del {s}/24 dev {a.intf_mbox}")


def test_server_without_mptcp_is_remembered(paper_tb):
    """A server that answered without MPTCP gets plain TCP sockets for --server-mptcp-retry seconds
    (cheaper than an MPTCP socket falling back); after that MPTCP is tried again, and used."""
    import time
    m = MiMBox(mode="static", extra=["--workers", "1", "--server-mptcp-retry", "2"])
    m.start(paper_tb, SERVER_PORT)
    try:
        transfer(paper_tb, m, up=1000, down=1000, server_mptcp=False)     # learns: no MPTCP there
        transfer(paper_tb, m, up=1000, down=1000, server_mptcp=False)     # plain TCP socket
        st = m.stats()
        assert st["server_tcp_remembered"] == 1 and st["server_tcp"] == 2, st
        t_learned = time.monotonic()
        _, s = transfer(paper_tb, m, up=1000, down=1000, server_mptcp=True)   # still within the 2 s
        assert s["mptcp"] is False and m.stats()["server_tcp_remembered"] == 2
        time.sleep(max(0.0, 2.2 - (time.monotonic() - t_learned)))   # the time under test: the 2 s memo runs out
        _, s = transfer(paper_tb, m, up=1000, down=1000, server_mptcp=True)   # tried again: MPTCP
        assert s["mptcp"] is True
        st = m.stats()
        assert st["server_tcp_remembered"] == 2 and st["server_mptcp"] == 1, st
    finally:
        m.stop()


def test_explicit_without_holding_reads_dstopt_from_bpf(paper_tb):
    """--syn-path accept in explicit mode: no SYN visits the converter, the BPF recorder tells it the
    destination; two listeners' recorders coexist on the same interfaces; all of it goes at stop."""
    ms = [MiMBox(mode="explicit", syn_path="accept"),
          MiMBox(mode="explicit", syn_path="accept")]
    for m in ms:
        m.start(paper_tb, SERVER_PORT)
    try:
        filters = paper_tb.mbox.cmd("tc filter show dev mbox-eth0 ingress")
        assert f"pref {ms[0].port}" in filters and f"pref {ms[1].port}" in filters, filters
        for m in ms:
            for size in (0, 1, 100_000):
                transfer(paper_tb, m, up=size, down=2 * size + 1)
            st = m.stats()
            assert st["syns"] == 0 and st["accepted"] == 3 and st["refused"] == {}, st
    finally:
        for m in ms:
            m.stop()
    assert "mimbox_record" not in paper_tb.mbox.cmd("tc filter show dev mbox-eth0 ingress")
    assert f"MIMBOX-{ms[0].port}" not in paper_tb.mbox.cmd("iptables -t raw -S")


def stats_after_transfers(tb, m: MiMBox, n: int) -> dict:
    """Start m, run n byte-checked 1 KB-up / 2 KB-down transfers through it, return its counters."""
    m.start(tb, SERVER_PORT)
    try:
        for _ in range(n):
            transfer(tb, m, up=1000, down=2000)
        return m.stats()
    finally:
        m.stop()


def test_auto_holds_at_a_low_rate_and_lets_the_kernel_answer_above_it(paper_tb):
    """--syn-path auto with --hold-rate 1: a few SYNs are held (and answered after the server), the
    rest skip the converter and are connected after accept(); every byte still arrives."""
    st = stats_after_transfers(paper_tb, MiMBox(mode="static", extra=[
                                                                               "--hold-rate", "1"]), 20)
    assert st["accepted"] == 20 and st["refused"] == {}, st
    assert 1 <= st["syns"] < 20, st        # held: the hashlimit's burst of 1, then 1/s


def test_workers_hand_over_only_held_connections(paper_tb):
    """2 workers, --hold-rate 1: SYNs past the rate are answered by the kernel; the worker that
    accept()s such a connection serves it itself, so hand-overs happen only for held SYNs."""
    st = stats_after_transfers(paper_tb, MiMBox(mode="static", extra=["--workers", "2", "--hold-rate", "1"]), 24)
    held = st["syns"] - st["deferred"]
    assert st["accepted"] == st["closed"] == 24 and st["refused"] == {}, st
    assert held < 24 and st["handed_over"] <= held, st
