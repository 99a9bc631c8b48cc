"""DST_OPT: one declaration shared by the parser, the BPF header and these tests; fuzzed."""
import random
import struct
import subprocess
import sys

import ledger
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mimbox.paths import BUILD
from mimbox.wire import dstopt
from mimbox.wire.dstopt import DstOpt, OptionError, parse_options, parse_syn
from topologies.support import scratch_netns


def test_roundtrip():
    o = DstOpt("192.0.2.7", 8080)
    raw = o.encode()
    assert len(raw) == dstopt.LENGTH == 10 and raw[0] == 253
    assert DstOpt.decode(raw) == o
    assert parse_options(b"\x02\x04\x05\xb4\x01\x01" + raw).dst == o


def test_ipv6_form_roundtrip():
    """An IPv6 destination takes the 22-byte form; an IPv4-mapped one the 10-byte form; the 22-byte
    form carrying a mapped address means that IPv4 address."""
    o = DstOpt("2001:db8:7::1", 443)
    raw = o.encode()
    assert len(raw) == dstopt.LENGTH6 == 22 and raw[:4] == b"\xfd\x16\x4d\x42"
    assert DstOpt.decode(raw) == o and parse_options(raw).dst == o
    assert len(DstOpt("::ffff:192.0.2.7", 80).encode()) == 10
    mapped = dstopt.STRUCT6.pack(253, 22, dstopt.EXID, bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 7]), 80)
    assert DstOpt.decode(mapped) == DstOpt("192.0.2.7", 80)


def test_bpf_header_is_generated_from_the_declaration():
    header = (BUILD / "bpf" / "dstopt.h").read_text()
    assert header == dstopt.c_header()
    assert f"#define DSTOPT_EXID 0x{dstopt.EXID:04X}" in header


@pytest.mark.parametrize("raw,reason", [
    (bytes([253, 9]) + b"\x4d\x42" + bytes(5), "length"),
    (bytes([253, 11]) + b"\x4d\x42" + bytes(7), "length"),
    (bytes([253, 10]) + b"\x12\x34" + bytes([10, 0, 0, 1, 0, 80]), "ExID"),
    (bytes([253, 10]) + b"\x4d\x42" + bytes([0, 0, 0, 0, 0, 80]), "0.0.0.0"),
    (bytes([253, 10]) + b"\x4d\x42" + bytes([10, 0, 0, 1, 0, 0]), "port 0"),
    (bytes([253, 10]) + b"\x4d\x42" + bytes([10, 0]), "length"),
    (bytes([253, 21]) + b"\x4d\x42" + bytes(17), "length"),
    (bytes([253, 22]) + b"\x4d\x42" + bytes(15) + b"\x01" + bytes(1), "length"),       # cut short
    (bytes([253, 22]) + b"\x4d\x42" + bytes(16) + b"\x00\x50", "address ::"),
    (bytes([253, 22]) + b"\x4d\x42" + bytes(10) + b"\xff\xff" + bytes(4) + b"\x00\x50", "address 0.0.0.0"),
    (bytes([253, 22]) + b"\x4d\x42" + bytes(15) + b"\x01" + b"\x00\x00", "port 0"),
    (bytes([253, 22]) + b"\x12\x34" + bytes(15) + b"\x01" + b"\x00\x50", "ExID"),
])
def test_malformed_options_are_refused_with_a_reason(raw, reason):
    r = parse_options(raw)
    assert r.dst is None and reason in r.dst_error


def test_two_dstopts_are_refused():
    raw = DstOpt("10.0.0.1", 80).encode()
    r = parse_options(raw + raw)
    assert r.dst is None and "more than one" in r.dst_error


def test_mptcp_subtypes_are_recognised():
    assert parse_options(bytes([30, 4, 0x01, 0x81])).mp_capable
    assert parse_options(bytes([30, 12, 0x10, 0]) + bytes(8)).mp_join


def syn_packet(options: bytes) -> bytes:
    options += b"\x00" * (-len(options) % 4)
    tcp = struct.pack("!HHIIBBHHH", 40000, 7000, 1, 0, (5 + len(options) // 4) << 4, 0x02, 65535, 0, 0) + options
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, bytes([10, 0, 1, 1]),
                     bytes([10, 0, 1, 2]))
    return ip + tcp


def test_parse_syn_reads_addresses_and_option():
    s = parse_syn(syn_packet(DstOpt("10.0.101.1", 9000).encode()))
    assert (s.src, s.sport, s.dst, s.dport) == ("10.0.1.1", 40000, "10.0.1.2", 7000)
    assert s.options.dst == DstOpt("10.0.101.1", 9000)


def test_parse_syn_agrees_with_scapy():
    """An independent encoder (scapy) builds the SYN; our parser reads the same fields."""
    from scapy.layers.inet import IP, TCP
    pkt = bytes(IP(src="10.0.2.1", dst="10.0.1.2") / TCP(sport=1234, dport=7000, flags="S",
                options=[("MSS", 1460), ("SAckOK", b""), (253, DstOpt("198.51.100.3", 443).encode()[2:])]))
    s = parse_syn(pkt)
    assert s.src == "10.0.2.1" and s.sport == 1234 and s.options.dst == DstOpt("198.51.100.3", 443)


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=40))
def test_parser_never_raises_on_any_option_bytes(raw):
    ledger.add(inputs=1)
    r = parse_options(raw)
    assert r.dst is None or isinstance(r.dst, DstOpt)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=80))
def test_parse_syn_raises_only_option_error(raw):
    ledger.add(inputs=1)
    try:
        parse_syn(raw)
    except OptionError:
        pass


def test_fuzz_100k_mutations_of_valid_syn_options():
    """10^5 mutated option lists (byte flips, truncations, splices): no exception escapes."""
    rng = random.Random(20131209)
    base = b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + bytes(8) + b"\x01\x03\x03\x07" + bytes([30, 4, 1, 0x81]) + \
        DstOpt("10.0.101.1", 80).encode()
    found = 0
    for i in range(100_000):
        b = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            if not b:
                break
            op = rng.random()
            if op < 0.5:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op < 0.75:
                del b[rng.randrange(len(b)):]
            else:
                b[rng.randrange(len(b)):rng.randrange(len(b))] = rng.randbytes(rng.randint(0, 6))
        r = parse_options(bytes(b[:40]))
        found += r.dst is not None
    assert 0 < found < 100_000   # mutations both keep and break the option: the fuzz explores both
    ledger.add(cases=1, inputs=100_000)


def test_bpf_recorder_agrees_with_the_core_parser():
    """The BPF recorder's option walk, run by the kernel (BPF_PROG_TEST_RUN, nothing attached) on
    the corpus the C and Python parsers are compared on, plus random bytes: it records a destination
    exactly when the converter's parser finds one, and the same one (it differed before: the
    recorder took the first DST_OPT of a list with two, and accepted malformed trailing options)."""
    import socket

    from test_core import option_lists
    from test_core import syn_packet as ip_syn

    from mimbox.converter import core
    from mimbox.converter.layouts import SynInfo
    from mimbox.host.synrecord import SynRecorder
    rec = SynRecorder(7000, devices=[])       # loaded and pinned, attached nowhere
    try:
        rec.install()
    except RuntimeError as e:
        pytest.skip(f"BPF recorder cannot load here: {e}")
    rng = random.Random(6994)
    blobs = list(option_lists(rng, 4000)) + [rng.randbytes(rng.randint(0, 40)) for _ in range(2000)]
    clients = ["10.0.1.1", "2001:db8:1::7"]          # an IPv4 frame, an IPv6 frame
    disagree, recorded, families = [], 0, set()
    try:
        for n, opts in enumerate(blobs):
            sport = 1024 + n                 # one key per SYN: first-wins never applies here
            src = clients[n % 2]
            pkt = ip_syn(opts, src=src, dst="10.0.1.2" if n % 2 == 0 else "2001:db8:1::2", sport=sport)
            info = SynInfo()
            assert core.lib().core_parse_syn(pkt, len(pkt), info) == 0
            frame = b"\x02" * 6 + b"\x04" * 6 + (b"\x08\x00" if n % 2 == 0 else b"\x86\xdd") + pkt
            rec.run_on(frame)
            got = rec.pop((src, sport))
            want = core.addr_of(info.dst_addr, info.dst_port) if info.has_dst else None
            if got is not None:
                recorded += 1
                families.add((":" in src, ":" in got[0]))
            if got != want:
                disagree.append((src, opts.hex(), got, want))
    finally:
        rec.remove()
    assert not disagree, disagree[:10]
    assert recorded > 300, recorded          # the corpus has valid DST_OPTs too
    assert families == {(False, False), (False, True), (True, False), (True, True)}, families
    ledger.add(inputs=len(blobs))


def test_bpf_recorder_a_same_destination_syn_renews_the_record():
    """A SYN naming the destination its (address, port) already has renews the record's time: a
    retransmission, or the port reused (a held SYN's record is never popped). It kept the first SYN's
    time before, so a reused port's SYN sent as that record neared 30 s was refused at accept as
    stale ('no destination': the scale-out figure's rare socket error). A SYN naming another
    destination keeps the first record, time and all, and is counted."""
    from test_core import syn_packet as ip_syn

    from mimbox.host.synrecord import SynRecorder
    rec = SynRecorder(7000, devices=[])       # loaded and pinned, attached nowhere
    try:
        rec.install()
    except RuntimeError as e:
        pytest.skip(f"BPF recorder cannot load here: {e}")
    key = dstopt.RECORD_KEY.pack(bytes(10) + b"\xff\xff" + bytes([10, 0, 1, 1]), 41000)

    def send(dst: str) -> int:
        pkt = ip_syn(DstOpt(dst, 80).encode(), src="10.0.1.1", sport=41000)
        rec.run_on(b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + pkt)
        raw = rec.map.lookup(key)
        assert raw is not None
        assert dstopt.RECORD_VALUE.unpack(raw[:dstopt.RECORD_VALUE.size])[0][12:] == bytes([10, 0, 101, 1])
        return int.from_bytes(raw[dstopt.RECORD_VALUE.size:], sys.byteorder)

    try:
        first = send("10.0.101.1")
        again = send("10.0.101.1")
        assert again > first, (first, again)
        assert rec.conflicts() == 0
        assert send("10.0.101.9") == again     # another destination: the record, time and all, stays
        assert rec.conflicts() == 1
        assert rec.pop(("10.0.1.1", 41000)) == ("10.0.101.1", 80)
    finally:
        rec.remove()


@pytest.mark.parametrize("order", ["first-in-first-out", "last-in-first-out"])
def test_two_recorders_share_a_clsact_qdisc_and_the_last_removes_it(order):
    """Two explicit-mode listeners on one host attach to the same interfaces: the clsact qdisc one
    of them added is gone when both have left, whichever leaves first (it stayed behind on a real
    host: tests/test_remote.py's reproduce run found it); a clsact that was there before stays."""
    with scratch_netns("mimbox-clsact") as ns:
        subprocess.run(["ip", "-n", ns, "link", "add", "d0", "type", "veth", "peer", "name", "d1"], check=True)
        subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "d1", "clsact"], check=True)
        script = (
            "import subprocess, sys\n"
            "from mimbox.host.synrecord import SynRecorder\n"
            "a = SynRecorder(65001, devices=['d0', 'd1']).install()\n"
            "b = SynRecorder(65002, devices=['d0', 'd1']).install()\n"
            "show = lambda: subprocess.run(['tc', 'qdisc', 'show'], capture_output=True, text=True).stdout\n"
            "assert show().count('clsact') == 2, show()\n"
            f"first, second = (a, b) if {order == 'first-in-first-out'!r} else (b, a)\n"
            "first.remove()\n"
            "assert show().count('clsact') == 2, show()      # the other still filters there\n"
            "second.remove()\n"
            "print(show())\n")
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=60)
        if p.returncode and "cannot" in p.stderr and "bpf" in p.stderr.lower():
            pytest.skip(f"BPF recorder cannot load here: {p.stderr[-300:]}")
        assert p.returncode == 0, p.stderr[-2000:]
        assert "clsact ffff: dev d0" not in p.stdout              # ours: gone with the last recorder
        assert "clsact ffff: dev d1" in p.stdout                  # there before us: left alone
