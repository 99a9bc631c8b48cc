"""DST_OPT, the paper's TCP option that tells the converter where the client really wants to go.

Declared once, here. The BPF programs get these constants from the header this module writes
(`python -m mimbox.wire.dstopt --header`), the converter parses SYNs with `parse_options`, and the
tests and fuzzers use `DstOpt.encode`.

Wire layout: an RFC 6994 shared experimental option (kind 253) carrying an address and a port, in
one of two forms told apart by the length byte. IPv4 (also an IPv4-mapped IPv6 destination):

    0        1        2        3        4        5        6        7        8        9
    +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+
    | kind   | length |      ExID       |        server IPv4 address        |   server port   |
    |  253   |   10   |     0x4D42      |          (network order)          | (network order) |
    +--------+--------+--------+--------+--------+--------+--------+--------+--------+--------+

IPv6: the same with a 16-byte address, 22 bytes in all (kind, 22, ExID, address, port).

Room in a SYN (TCP options are at most 40 bytes; measured with the client's BPF program, which reads
`remaining_opt_len` when the kernel asks it how much it will add, tests/test_ipv6.py and
results/dstopt_room): Linux's own SYN options take MSS 4 + SACK-permitted with timestamps 12 +
window scale 4, and MP_CAPABLE (v1) 4 more: 16 bytes are left for an MPTCP SYN with timestamps, 20 for
a TCP one, 24 and 28 without timestamps. The IPv4 form fits everywhere; the IPv6 form needs the
client to send SYNs without timestamps (`sysctl net.ipv4.tcp_timestamps=0` on the client, which also
governs IPv6). When the option does not fit, the kernel sends the SYN without it
(bpf_reserve_hdr_opt fails with ENOSPC) and the converter refuses that SYN (no DST_OPT): `mimbox
client` warns at start when timestamps are on and counts the SYNs that had no room.
"""
from __future__ import annotations

import argparse
import ipaddress
import socket
import struct
import sys
from dataclasses import dataclass

from mimbox.wire.addrs import source_bad

KIND = 253          # RFC 4727/6994 experimental option, shared through an ExID
EXID = 0x4D42       # "MB": our RFC 6994 experiment identifier
LENGTH = 10         # the IPv4 form
LENGTH6 = 22        # the IPv6 form
STRUCT = struct.Struct("!BBH4sH")  # kind, length, ExID, address, port
STRUCT6 = struct.Struct("!BBH16sH")
assert STRUCT.size == LENGTH and STRUCT6.size == LENGTH6
OFF_EXID, OFF_ADDR = 2, 4        # the port follows the address: at 8, or 20 in the IPv6 form

# What the converter-side BPF program (mimbox/bpf/dstopt_server.bpf.c) records per client SYN
# seen with a DST_OPT: key (client address, client port), value (server address, server port,
# when: CLOCK_MONOTONIC ns, host order); addresses (16 bytes, IPv4 as ::ffff:a.b.c.d as in
# native/core/addr.h) and ports in network order. Mirrored in the generated header as C structs. The first DST_OPT of a (client address, port) wins for
# RECORD_TTL_NS: a later SYN from it that names another destination is refused (RST) and counted.
RECORD_KEY = struct.Struct("!16sH2x")
RECORD_VALUE = struct.Struct("!16sH6x")     # the first 24 bytes; then the time (see RECORD_VALUE_SIZE)
RECORD_VALUE_SIZE = 32
RECORD_ENTRIES = 65536          # LRU: a flood of SYNs that never complete pushes out only the oldest
RECORD_TTL_NS = 30_000_000_000  # a record older than this is stale: a new SYN replaces it

TCPOPT_EOL, TCPOPT_NOP = 0, 1
TCPOPT_MPTCP = 30
MPTCP_SUB_CAPABLE, MPTCP_SUB_JOIN = 0, 1


class OptionError(ValueError):
    """A malformed or refused DST_OPT; the message says why (it goes to the log line)."""


@dataclass(frozen=True)
class DstOpt:
    """The real server a client asked for."""
    addr: str
    port: int

    def encode(self) -> bytes:
        """The option's bytes: 10 for an IPv4 (or IPv4-mapped) address, 22 for an IPv6 one."""
        ip = ipaddress.ip_address(self.addr)
        ip = getattr(ip, "ipv4_mapped", None) or ip
        if ip.version == 4:
            return STRUCT.pack(KIND, LENGTH, EXID, ip.packed, self.port)
        return STRUCT6.pack(KIND, LENGTH6, EXID, ip.packed, self.port)

    @classmethod
    def decode(cls, raw: bytes) -> "DstOpt":
        """Parse one option (kind byte first); raise OptionError if it is not a valid DST_OPT."""
        if len(raw) < 2 or raw[0] != KIND:
            raise OptionError("not an experimental option")
        if raw[1] not in (LENGTH, LENGTH6) or len(raw) != raw[1]:
            raise OptionError(f"DST_OPT length {raw[1]} (expected {LENGTH} or {LENGTH6})")
        _, _, exid, addr, port = (STRUCT if raw[1] == LENGTH else STRUCT6).unpack(raw)
        if exid != EXID:
            raise OptionError(f"unknown ExID 0x{exid:04x}")
        if port == 0:
            raise OptionError("DST_OPT port 0")
        ip = ipaddress.ip_address(addr)
        ip = getattr(ip, "ipv4_mapped", None) or ip      # the IPv6 form may carry a mapped IPv4 address
        if ip.is_unspecified:
            raise OptionError(f"DST_OPT address {ip}")
        return cls(str(ip), port)


@dataclass(frozen=True)
class SynOptions:
    """What the converter needs from a SYN's TCP options."""
    dst: DstOpt | None          # the DST_OPT, if one was present and valid
    dst_error: str | None       # why a present DST_OPT-looking option was refused
    mp_capable: bool
    mp_join: bool


def parse_options(opts: bytes) -> SynOptions:
    """Walk the TCP option list of a SYN. Never raises: malformed input is reported, not thrown."""
    dst = None
    err = None
    mpc = join = False
    i, n = 0, len(opts)
    while i < n:
        kind = opts[i]
        if kind == TCPOPT_EOL:
            break
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            err = err or "truncated option list"
            break
        length = opts[i + 1]
        if length < 2 or i + length > n:
            err = err or f"bad option length {length} for kind {kind}"
            break
        body = opts[i:i + length]
        if kind == KIND:
            exid = int.from_bytes(body[2:4], "big") if length >= 4 else None
            if exid is not None and exid != EXID:
                err = err or f"unknown ExID 0x{exid:04x}"
            elif dst is not None:
                err = "more than one DST_OPT"
            else:
                try:
                    dst = DstOpt.decode(body)
                except OptionError as e:
                    err = str(e)
        elif kind == TCPOPT_MPTCP and length >= 3:
            sub = body[2] >> 4
            mpc |= sub == MPTCP_SUB_CAPABLE
            join |= sub == MPTCP_SUB_JOIN
        i += length
    if err:
        dst = None
    return SynOptions(dst, err, mpc, join)


@dataclass(frozen=True)
class Syn:
    """The fields of a TCP SYN (IPv4, or IPv6 without extension headers) the converter decides on."""
    src: str
    sport: int
    dst: str
    dport: int
    flags: int
    options: SynOptions
    bad_source: bool = False    # no real client has this source (mimbox.wire.addrs.source_bad)


def parse_syn(packet: bytes) -> Syn:
    """Parse an IPv4 packet, or an IPv6 packet whose next header is TCP, holding a TCP segment (as
    native/core/synopt.c does); raise OptionError if it is not one."""
    if len(packet) >= 20 and packet[0] >> 4 == 4:
        ihl = (packet[0] & 0x0F) * 4
        if ihl < 20 or packet[9] != 6:
            raise OptionError("not TCP")
        src, dst = socket.inet_ntop(socket.AF_INET, packet[12:16]), socket.inet_ntop(socket.AF_INET, packet[16:20])
        bad = source_bad(src, False, ipaddress.ip_address(dst).is_loopback)
    elif len(packet) >= 40 and packet[0] >> 4 == 6:
        ihl = 40
        if packet[6] != 6:
            raise OptionError("not TCP right after the IPv6 header")
        src, dst = (ipaddress.IPv6Address(packet[8:24]), ipaddress.IPv6Address(packet[24:40]))
        bad = source_bad(src, True, (dst.ipv4_mapped or dst).is_loopback)
        src, dst = (str(a.ipv4_mapped or a) for a in (src, dst))
    else:
        raise OptionError("not IPv4 or IPv6")
    if len(packet) < ihl + 20:
        raise OptionError("not TCP")
    tcp = packet[ihl:]
    doff = (tcp[12] >> 4) * 4
    if doff < 20 or len(tcp) < doff:
        raise OptionError("bad TCP data offset")
    sport, dport = struct.unpack_from("!HH", tcp)
    return Syn(src=src, sport=sport, dst=dst, dport=dport, flags=tcp[13], options=parse_options(bytes(tcp[20:doff])),
               bad_source=bad)


def c_header() -> str:
    """The constants for the BPF side, generated from this module."""
    from mimbox.codes import REFUSE_MARK
    return (
        "/* Generated by `python -m mimbox.wire.dstopt --header`: do not edit. */\n"
        "#pragma once\n"
        f"#define DSTOPT_KIND {KIND}\n"
        f"#define DSTOPT_LEN {LENGTH}\n"
        f"#define DSTOPT_EXID 0x{EXID:04X}\n"
        f"#define DSTOPT_LEN6 {LENGTH6}\n"
        "/* layout: kind, len, exid (be16), addr (be32, or 16 bytes when len is DSTOPT_LEN6), port (be16) */\n"
        f"#define DSTOPT_OFF_EXID {OFF_EXID}\n#define DSTOPT_OFF_ADDR {OFF_ADDR}\n"
        f"#define DSTOPT_OFF_PORT {OFF_ADDR + 4}\n#define DSTOPT_OFF_PORT6 {OFF_ADDR + 16}\n"
        f"#define DSTOPT_RECORD_ENTRIES {RECORD_ENTRIES}\n"
        "/* RECORD_KEY / RECORD_VALUE of mimbox/wire/dstopt.py: network order; IPv4 as ::ffff:a.b.c.d */\n"
        "struct dstopt_record_key { __u8 saddr[16]; __u16 sport; __u16 pad; };\n"
        "struct dstopt_record_value { __u8 addr[16]; __u16 port; __u16 pad[3]; __u64 t_ns; };\n"
        f"#define DSTOPT_RECORD_TTL_NS {RECORD_TTL_NS}ULL\n"
        f"#define DSTOPT_REFUSE_MARK 0x{REFUSE_MARK:X}u\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="DST_OPT layout tools")
    ap.add_argument("--header", action="store_true", help="print the C header for the BPF programs")
    a = ap.parse_args(argv)
    if a.header:
        sys.stdout.write(c_header())
    return 0


if __name__ == "__main__":
    sys.exit(main())
