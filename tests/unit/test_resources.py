"""mimbox.host.resources: what a connection holds at rest, the limit's account, the pressure watch."""
import logging
import resource

from mimbox.converter.synpath import Admission
from mimbox.host import resources
from mimbox.ops.flags import build_parser, config_from_args

SLABINFO = """slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables ...
MPTCPv6               10     10   2112   15    8 : tunables    0    0    0 : slabdata      1      1      0
MPTCP                  5      5   1984   16    8 : tunables    0    0    0 : slabdata      1      1      0
TCPv6                 10     10   2496   13    8 : tunables    0    0    0 : slabdata      1      1      0
TCP                   10     10   2368   13    8 : tunables    0    0    0 : slabdata      1      1      0
sock_inode_cache      10     10    832   19    4 : tunables    0    0    0 : slabdata      1      1      0
filp                  10     10    192   21    1 : tunables    0    0    0 : slabdata      1      1      0
dentry                10     10    192   21    1 : tunables    0    0    0 : slabdata      1      1      0
eventpoll_epi         10     10    128   32    1 : tunables    0    0    0 : slabdata      1      1      0
"""


def test_what_a_connection_holds_at_rest_by_slab(monkeypatch, tmp_path):
    sizes = resources.slab_sizes(SLABINFO)
    assert sizes["TCPv6"] == 2496 and sizes["eventpoll_epi"] == 128
    f = tmp_path / "slabinfo"
    f.write_text(SLABINFO)
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(f if p == "/proc/slabinfo" else p, *a, **k))
    monkeypatch.setattr(resources, "_at_rest", None)
    # MPTCPv6 + 3 TCPv6 (2 subflows, the server's) + 4 inodes + 2 files + 2 dentries + 2 epoll entries,
    # two subflow contexts, the core's slot
    expect = 2112 + 3 * 2496 + 4 * 832 + 2 * 192 + 2 * 192 + 2 * 128 + 2 * 1024 + 512
    assert resources.bytes_at_rest() == expect
    f.write_text(SLABINFO.replace("TCPv6", "XXX").replace("TCP ", "YYY "))   # read once: kept
    assert resources.bytes_at_rest() == expect
    monkeypatch.setattr(resources, "_at_rest", None)
    assert resources.bytes_at_rest() == resources.FALLBACK_AT_REST   # a cache missing: the safe bound


def test_default_limit_admits_what_the_memory_holds_not_every_buffers_worst_case():
    cfg = config_from_args(build_parser().parse_args(["run", "--upstream", "192.0.2.1:80"]))
    assert cfg.connection_limit() == resources.default_budget() // resources.bytes_at_rest()
    # this machine's 24 GB hold far more than 100,000 connections at rest (2,234 before)
    assert resources.memory_available() < 16 << 30 or cfg.connection_limit() >= 100_000
    # buffer caps do not change what a connection holds at rest
    capped = config_from_args(build_parser().parse_args(
        ["run", "--upstream", "192.0.2.1:80", "--client-rcvbuf", "1M", "--memory-budget", "100M"]))
    assert capped.connection_limit() == (100 << 20) // resources.bytes_at_rest()
    explicit = config_from_args(build_parser().parse_args(
        ["run", "--upstream", "192.0.2.1:80", "--max-connections", "7"]))
    assert explicit.connection_limit() == 7 and explicit.memory_limit() is None


def test_the_start_up_line_says_which_limit_binds():
    room = resources.FdRoom(connections=8848, limit=20000, hard=20000, capped=True)
    line = resources.limit_line(1_000_000, 1_000_000, room, 2)
    assert line.startswith("limit 17696 connections (open files bind: 20000 per process")
    assert "memory would admit 1000000" in line and "--workers" in line and "LimitNOFILE" in line
    assert resources.limit_line(500, 500, room, 1).startswith("limit 500 connections (memory binds")
    assert resources.limit_line(7, None, room, 1) == "limit 7 connections (--max-connections)"


def test_static_mode_limit_counts_the_upstreams_local_ports(monkeypatch):
    """One upstream takes a local port a connection from each source address: static mode's limit is
    at most the ports times the source addresses of its family, and the start-up line says so."""
    assert resources.port_count("32768\t60999", "") == 28232
    assert resources.port_count("1024 65000", "5000-9999,17000-17999") == 63977 - 6000
    assert resources.port_count("1024 2047", "2000,3000-4000") == 1023
    monkeypatch.setattr(resources, "local_ports", lambda: 1000)
    parse = lambda *a: config_from_args(build_parser().parse_args(["run", "--mode", "static", "--upstream", *a]))  # noqa: E731
    one = parse("192.0.2.1:80")
    assert one.ports_limit() == 1000 and one.connection_limit() == 1000
    three = parse("192.0.2.1:80", "--source-address", "192.0.2.7", "--source-address", "192.0.2.8",
                  "--source-address", "2001:db8::8", "--source-address", "192.0.2.9")
    assert three.upstream_sources() == 3 and three.connection_limit() == 3000    # the IPv6 one cannot serve it
    assert parse("192.0.2.1:80", "--max-connections", "5000").connection_limit() == 5000
    explicit = config_from_args(build_parser().parse_args(["run", "--upstream", "192.0.2.1:80"]))
    assert explicit.ports_limit() is None
    room = resources.FdRoom(connections=8848, limit=20000, hard=20000, capped=True)
    line = resources.limit_line(3000, 1_000_000, room, 2, three.ports_limit(), three.upstream_sources())
    assert line.startswith("limit 3000 connections (local ports bind: the upstream takes one of 1000 ports")
    assert "each of 3 source addresses" in line and "--source-address" in line
    assert resources.limit_line(3000, 1_000_000, room, 2, 10**6, 1).startswith("limit 17696 connections (open files")


def test_a_source_address_not_the_hosts_is_named_at_start():
    import pytest
    resources.check_sources(("127.0.0.1",))
    with pytest.raises(RuntimeError, match="source address 192.0.2.99: not an address of this host"):
        resources.check_sources(("127.0.0.1", "192.0.2.99"))
    for bad in ("nonsense", "0.0.0.0", "224.0.0.1"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            config_from_args(build_parser().parse_args(["run", "--mode", "static", "--upstream", "192.0.2.1:80",
                                                        "--source-address", bad]))


def test_fd_limit_raised_as_far_as_the_hard_limit_allows():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        room = resources.raise_fd_limit(10_000_000, pipes=64)      # far beyond any hard limit here
        now = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert room.capped and room.limit == now[0] >= soft
        assert room.connections == (now[0] - 2 * 64 - resources.FD_RESERVE) // 2
        assert not resources.raise_fd_limit(10, pipes=64).capped
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_memory_pressure_refuses_from_90_percent_admits_again_below_80_logged_once(caplog):
    adm = Admission(10)
    readings = iter([(800, 1000), (900, 1000), (950, 1000), (850, 1000), (799, 1000), (100, 1000)])
    watch = resources.MemoryPressure(adm, read=lambda: next(readings))
    with caplog.at_level(logging.WARNING, logger="mimbox"):
        seen = [(watch.check(), adm.pressure) for _ in range(6)]
    assert seen == [(False, 0), (True, 900), (True, 950), (True, 850), (False, 0), (False, 0)]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("memory pressure: the kernel's TCP memory holds 900 pages, 90%")
    assert lines[1].startswith("memory pressure over")


def test_tcp_memory_read_from_sockstat():
    assert resources.tcp_memory("sockets: used 12\nTCP: inuse 4 orphan 0 tw 0 alloc 44 mem 17\nUDP: inuse 0 mem 3\n") == 17
    assert resources.tcp_memory("UDP: inuse 0 mem 3\n") == 0
    used, threshold = resources.MemoryPressure._read()
    assert used >= 0 and threshold > 0
