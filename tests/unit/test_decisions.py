"""The converter's decision logic, without sockets or root: `pytest tests/unit` as any user."""
import errno
import ipaddress
import logging

import pytest
from oracle import PolicyOracle

from mimbox.codes import CAUSES
from mimbox.config import Config, SafetyConfig
from mimbox.converter import core
from mimbox.converter.safety import destination_rules, parse_destination
from mimbox.converter.synpath import (
    Admission,
    Cause,
    RefusalLog,
)
from mimbox.converter.validation import validate
from mimbox.host.netfilter import ListenerRules, worker_of_port, worker_port_ranges


def ip(a: str) -> int:
    return int(ipaddress.IPv4Address(a))


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class TestRefusalLog:
    def test_burst_then_one_summary_line_counters_elsewhere(self, caplog):
        clock = FakeClock()
        rl = RefusalLog(logging.getLogger("t"), burst=3, interval=1.0, clock=clock)
        with caplog.at_level(logging.WARNING, logger="t"):
            for i in range(1000):
                rl.refused(Cause.PENDING_LIMIT if i % 2 else Cause.BAD_OPTION, f"10.0.1.{i % 250}:{i}")
            assert len(caplog.records) == 3
            clock.t += 1.0
            rl.refused(Cause.BAD_OPTION, "10.0.1.1:1")
        msgs = [r.getMessage() for r in caplog.records]
        assert len(msgs) == 5 and rl.lines == 5
        assert "997 more refusals suppressed" in msgs[3]
        assert "pending limit 499" in msgs[3] and "bad option 498" in msgs[3]
        assert msgs[0].startswith("refused 10.0.1.0:0") and msgs[0].endswith("bad option")

    def test_quiet_windows_write_nothing_extra(self, caplog):
        clock = FakeClock()
        rl = RefusalLog(logging.getLogger("t2"), burst=2, clock=clock)
        with caplog.at_level(logging.WARNING, logger="t2"):
            for _ in range(5):
                rl.refused(Cause.SERVER_REFUSED, "x")
                clock.t += 2
        assert rl.lines == 5 and not rl.suppressed


def _admit(a: Admission) -> bool:
    return bool(core.lib().core_admit(a.address(), a.limit))


def test_admission_limit():
    """The core's atomic operations on the shared counter (native/core/admit.c core_admit)."""
    a = Admission(2)
    assert _admit(a) and _admit(a) and not _admit(a)
    core.lib().core_unadmit(a.address())
    assert a.used == 1 and _admit(a)


def test_shared_admission_counts_across_processes():
    import multiprocessing
    a = Admission(3, shared=True)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=lambda: [_admit(a) for _ in range(2)])
    p.start()
    p.join(10)
    assert a.used == 2 and _admit(a) and not _admit(a)


@pytest.mark.parametrize("err,cause", [(errno.ECONNREFUSED, Cause.SERVER_REFUSED),
                                       (errno.EHOSTUNREACH, Cause.SERVER_UNREACHABLE),
                                       (errno.ENETUNREACH, Cause.SERVER_UNREACHABLE),
                                       (errno.ETIMEDOUT, Cause.SERVER_TIMEOUT), (errno.EPIPE, Cause.SERVER_ERROR)])
def test_cause_of_errno(err, cause):
    """C's own mapping of a failed server connection's errno (native/core/connect.c)."""
    assert CAUSES[core.lib().core_cause_of_errno(err)] is cause


def test_causes_are_keys_without_addresses():
    for c in Cause:
        assert not any(ch.isdigit() for ch in c.value), c


def policy(allow=("10.0.1.0/24",), allow_dst=("10.0.101.0/24",), deny_dst=(), own=("10.0.1.2",)) -> PolicyOracle:
    cfg = SafetyConfig(allow_clients=allow, allow_dst=allow_dst, deny_dst=deny_dst)
    return PolicyOracle(allow_clients=[ipaddress.IPv4Network(n) for n in allow], rules=destination_rules(cfg),
                  own={ipaddress.IPv4Address(a) for a in own})


@pytest.mark.parametrize("client,dst,port,cause", [
    ("10.0.1.5", "10.0.101.1", 80, None),
    ("10.0.9.5", "10.0.101.1", 80, Cause.CLIENT_NOT_ALLOWED),
    ("10.0.1.5", "10.0.1.2", 80, Cause.DESTINATION_DENIED),
    ("10.0.1.5", "127.0.0.1", 22, Cause.DESTINATION_DENIED),
    ("10.0.1.5", "10.0.101.1", 0, Cause.DESTINATION_DENIED),
    ("10.0.1.5", "10.0.102.1", 80, Cause.DESTINATION_DENIED),       # private, not allowed
    ("10.0.1.5", "192.168.1.1", 443, Cause.DESTINATION_DENIED),
    ("10.0.1.5", "100.64.0.1", 443, Cause.DESTINATION_DENIED),       # CGNAT
    ("10.0.1.5", "198.18.0.1", 443, Cause.DESTINATION_DENIED),       # benchmarking
    ("10.0.1.5", "8.8.8.8", 443, None),                              # public unicast
    ("10.0.1.5", "8.8.8.8", 25, Cause.DESTINATION_DENIED),           # SMTP
])
def test_default_policy(client, dst, port, cause):
    r = policy().refusal(client, dst, port)
    assert (r[0] if r else None) is cause
    if r:
        assert client in r[1] or dst in r[1] or "port 0" in r[1]     # the addresses go to the detail


def test_destination_rules_with_ports_first_match_wins():
    p = policy(allow_dst=("192.168.1.0/24:80,443,8000-8080", "0.0.0.0/0:25"), deny_dst=("192.168.1.7:443",))
    allowed = lambda d, port: p.refusal("10.0.1.5", d, port) is None   # noqa: E731
    assert allowed("192.168.1.1", 80) and allowed("192.168.1.1", 8080) and allowed("192.168.1.1", 8000)
    assert not allowed("192.168.1.1", 22) and not allowed("192.168.1.1", 8081)
    assert not allowed("192.168.1.7", 443) and allowed("192.168.1.7", 80)   # a deny comes before an allow
    assert allowed("8.8.8.8", 25)                                           # opened explicitly
    assert not allowed("127.0.0.1", 80) and not allowed("224.0.0.1", 80)    # never, whatever is allowed
    assert not policy(allow_dst=("0.0.0.0/0",)).refusal("10.0.1.5", "169.254.1.1", 80) is None


@pytest.mark.parametrize("text", ["10.0.0.0/33", "10.0.0.0/8:0", "10.0.0.0/8:80-70", "10.0.0.0/8:http",
                                  "2001:db8::/129", "[2001:db8::/32", "[2001:db8::/32]80", "[2001:db8::/32]:0",
                                  "2001:db8::/32:80", "fe80::1%eth0"])
def test_bad_destination_rules_are_clear_errors(text):
    with pytest.raises(ValueError, match=r"10\.0\.0\.0|2001:db8|fe80"):
        parse_destination(text, True)
    with pytest.raises(ValueError):
        validate(Config(safety=SafetyConfig(allow_dst=(text,))))


def test_own_addresses_are_refreshed():
    p = policy()
    assert p.refusal("10.0.1.5", "10.0.101.9", 80) is None
    assert p.set_own(["10.0.1.2", "10.0.101.9"]) and not p.set_own(["10.0.101.9", "10.0.1.2"])
    assert p.refusal("10.0.1.5", "10.0.101.9", 80)[0] is Cause.DESTINATION_DENIED


def test_worker_of_port_splits_evenly_and_matches_the_rules():
    for workers in (1, 2, 3, 4, 7):
        ranges = worker_port_ranges(workers)
        for b in range(256):
            w = worker_of_port(b, workers)
            assert ranges[w][0] <= b <= ranges[w][1]
        sizes = [hi - lo + 1 for lo, hi in ranges]
        assert max(sizes) - min(sizes) <= 1


def test_hold_rate_is_a_per_prefix_hashlimit_per_worker():
    r = ListenerRules(port=7000, queue_num=4200, workers=2, hold_rate=50)
    args = r._rate(1, 4)
    assert args[args.index("--hashlimit-upto") + 1] == "50/sec"
    assert args[args.index("--hashlimit-srcmask") + 1] == "24"
    assert args[args.index("--hashlimit-name") + 1] == "mimbox7000w1"
    v6 = r._rate(1, 6)                      # IPv6 clients are counted per /64, in a table of their own
    assert v6[v6.index("--hashlimit-srcmask") + 1] == "64"
    assert v6[v6.index("--hashlimit-name") + 1] == "mimbox7000w1v6"
    assert ListenerRules(port=7000, queue_num=4200)._rate(0, 4) == []


def test_listener_rules_cover_the_families_the_listener_serves():
    """[::] serves both families: rules in iptables and ip6tables; an address of one family, its own."""
    from mimbox.host.netfilter import families_of
    assert families_of("::") == (4, 6) and families_of("0.0.0.0") == (4,)
    assert families_of("10.0.0.1") == (4,) and families_of("2001:db8::1") == (6,)
    r = ListenerRules(port=7000, queue_num=4200, workers=2, listen_addr="::")
    for family, sport in ((4, "0>>22&0x3C@0>>16&0xFF=0:127"), (6, "40>>16&0xFF=0:127")):
        (match,) = r._syn_matches(family)
        assert "-d" not in match                                   # a wildcard listener: any destination
        assert r._queues(family)[0] == (4200, ["-m", "u32", "--u32", sport])
    t = ListenerRules(port=7000, queue_num=4200, transparent_ports=(80,), transparent_from=("10.0.0.0/8", "fd00::/8"))
    assert t._sources(4) == [["-s", "10.0.0.0/8"]] and t._sources(6) == [["-s", "fd00::/8"]]


def test_listener_jumps_only_where_a_chain_acts():
    """Every packet walks the hooks: a jump matches only what its chain acts on, and a listener that
    queues no SYN (--syn-path accept) has no raw jump; the refusal jump stays (the BPF recorder marks
    a conflicting DST_OPT without any queue: test_hostile.py::test_first_dstopt_wins[bpf])."""
    held = {(t, h): m for t, h, m in ListenerRules(port=7000, queue_num=4200)._jumps()}
    assert held[("raw", "PREROUTING")] == ["-p", "tcp", "--syn"]
    assert "--mark" in held[("filter", "INPUT")] and ("mangle", "PREROUTING") not in held
    unqueued = {(t, h): m for t, h, m in ListenerRules(port=7000, queue_num=4200, queue_syns=False)._jumps()}
    assert set(unqueued) == {("filter", "INPUT")} and "--mark" in unqueued[("filter", "INPUT")]
    t = {(a, b): m for a, b, m in ListenerRules(port=7000, queue_num=4200, queue_syns=False,
                                                transparent_ports=(80,))._jumps()}
    assert t[("mangle", "PREROUTING")] == ["-p", "tcp"] and ("raw", "PREROUTING") not in t


def test_held_set_is_shared_memory_across_workers():
    """The workers' cores write held SYNs into HeldSet.slots (native/core/synq.c) and read each
    other's there (accept.c): a write in one forked process is seen in the other."""
    import multiprocessing

    from mimbox.converter.synpath import HeldSet
    h = HeldSet(slots=1024)
    assert h.mask == 1023 and len(h.slots) == 1024
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=lambda: h.slots.__setitem__(5, 0x0A00010100009C41))
    p.start()
    p.join(10)
    assert h.slots[5] == 0x0A00010100009C41
    with pytest.raises(ValueError):
        HeldSet(slots=1000)


def test_cli_defaults_are_the_configs_defaults():
    """Each default is defined once, in mimbox.config: the command line without options gives it."""
    import dataclasses

    from mimbox.config import BufferConfig, ListenerConfig, SafetyConfig
    from mimbox.ops.flags import build_parser, config_from_args
    cfg = config_from_args(build_parser().parse_args(["run", "--mode", "static", "--upstream", "10.0.101.1:80"]))
    assert cfg.listener == dataclasses.replace(ListenerConfig(), mode="static", upstream=("10.0.101.1", 80))
    assert cfg.buffers == BufferConfig()
    assert cfg.safety == SafetyConfig()


def test_local_addresses_match_ip_addr():
    """The converter's own addresses and subnets (netlink through pyroute2) are what `ip` reports."""
    import json
    import subprocess

    from mimbox.config import local_addresses, local_subnets
    out = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True).stdout)
    addrs = [(a["local"], a["prefixlen"]) for link in out for a in link.get("addr_info", [])]
    assert sorted(local_addresses()) == sorted(a for a, _ in addrs)
    nets = [ipaddress.ip_network(f"{a}/{n}", strict=False) for a, n in addrs]
    assert sorted(local_subnets()) == sorted(str(n) for n in nets if not n.is_loopback and not n.is_link_local)


def test_static_upstream_is_allowed_unless_denied_and_a_denied_one_is_said():
    """Issue 36 finding 6: `mimbox run --mode static --upstream 10.0.101.1:80` (the README's own line)
    refused every client (RFC 1918 denied by default). The operator's upstream is allowed; one they
    deny themselves, or one that can never be a destination, is said at start."""
    import ipaddress

    from mimbox.config import SafetyConfig
    from mimbox.converter.safety import Policy, destination_rules
    clients = [ipaddress.ip_network("10.0.1.0/24")]
    up = ("10.0.101.1", 80)
    plain = Policy(allow_clients=clients, rules=destination_rules(SafetyConfig()))
    assert plain.decide("10.0.1.5", *up) is not None           # without the upstream rule: denied
    p = Policy(allow_clients=clients, rules=destination_rules(SafetyConfig(), up))
    assert p.decide("10.0.1.5", *up) is None and p.static_refusal(up) is None
    assert p.decide("10.0.1.5", "10.0.101.1", 81) is not None   # that server and port, nothing else
    denied = Policy(allow_clients=clients, rules=destination_rules(SafetyConfig(deny_dst=("10.0.101.0/24",)), up))
    assert "--deny-destination" in denied.static_refusal(up)
    loop = Policy(allow_clients=clients, rules=destination_rules(SafetyConfig(), ("127.0.0.1", 8080)))
    assert "always" in loop.static_refusal(("127.0.0.1", 8080))
