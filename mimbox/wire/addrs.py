"""Addresses of both families, as the converter holds them (the Python side of native/core/addr.h):
one 128-bit space, an IPv4 address as its IPv4-mapped form ::ffff:a.b.c.d (RFC 4291 2.5.5.2) — the
form a dual-stack listener's accept() returns and an RFC 8803 Connect carries. So one policy, one
gate and one wire format serve both families.

    packed("10.0.0.1")   -> 16 bytes (the core's and RFC 8803's form)
    text(raw16)          -> "10.0.0.1" / "2001:db8::1"
    prefix("10.0.0.0/8") -> (16 bytes, 104): a length over the 16 bytes
    as_int(addr), prefix_ints(net) -> the same as integers (mimbox.converter.safety's policy)
    source_bad(addr, wire_v6, to_loopback) -> no real client has this source (native/core/addr.h)
"""
from __future__ import annotations

import ipaddress
import socket

V4_MAPPED = bytes(10) + b"\xff\xff"     # ::ffff:0:0/96, where IPv4 lives
MAPPED_INT = 0xFFFF << 32


def packed(addr) -> bytes:
    """An address (string or ipaddress object) as 16 bytes."""
    a = ipaddress.ip_address(addr)
    return a.packed if a.version == 6 else V4_MAPPED + a.packed


def text(raw) -> str:
    """16 bytes as an address string: dotted for an IPv4(-mapped) one, else IPv6."""
    raw = bytes(raw)
    return socket.inet_ntop(socket.AF_INET, raw[12:]) if raw[:12] == V4_MAPPED else socket.inet_ntop(socket.AF_INET6, raw)


def known(raw) -> bool:
    """Whether 16 bytes hold an address (:: and 0.0.0.0: not known yet)."""
    raw = bytes(raw)
    return any(raw) and raw != V4_MAPPED + bytes(4)


def _length(n) -> int:
    return n.prefixlen + (96 if n.version == 4 else 0)


def prefix(net) -> tuple[bytes, int]:
    """A prefix of either family as (16-byte network, length over 16 bytes: an IPv4 /24 is /120)."""
    n = ipaddress.ip_network(net, strict=False)
    return packed(n.network_address), _length(n)


def as_int(addr) -> int:
    """An address of either family as one 128-bit integer."""
    a = ipaddress.ip_address(addr)
    return MAPPED_INT | int(a) if a.version == 4 else int(a)


def prefix_ints(net) -> tuple[int, int]:
    """A prefix of either family as (network, mask) over the 128 bits of as_int."""
    n = ipaddress.ip_network(net, strict=False)
    mask = ((1 << 128) - 1) ^ ((1 << (128 - _length(n))) - 1)
    return as_int(n.network_address) & mask, mask


def source_bad(addr, wire_v6: bool = False, to_loopback: bool = False) -> bool:
    """Whether no real client has this source address (native/core/addr.h addr_source_bad; tests
    compare the two): IPv4 0/8, 127/8, 224/4, 240/4; IPv6 ::/96 (unspecified, loopback,
    IPv4-compatible), ff00::/8, and the IPv4-mapped ::ffff:0:0/96 when it came as an IPv6 source on
    the wire (`wire_v6`; a dual-stack accept() gives IPv4 clients that form). A loopback source is
    real only towards a loopback address (`to_loopback`)."""
    a = ipaddress.ip_address(addr)
    mapped = a.version == 6 and a.ipv4_mapped is not None
    v4 = a.ipv4_mapped if mapped else a if a.version == 4 else None
    if (v4 or a).is_loopback:
        return not to_loopback or (wire_v6 and v4 is not None)
    if v4 is not None:
        return wire_v6 and mapped or int(v4) >> 24 == 0 or int(v4) >> 24 >= 224
    return int(a) >> 32 == 0 or a.is_multicast


def gate_prefix(addr: str) -> bytes:
    """The client prefix the core's gate counts by (native/core/addr.h gate_prefix), as a key: an
    IPv4 /24 (3 bytes) or an IPv6 /64 (8 bytes). Per greeting: no ipaddress parse."""
    if ":" not in addr:
        return socket.inet_aton(addr)[:3]
    raw = socket.inet_pton(socket.AF_INET6, addr.partition("%")[0])
    return raw[12:15] if raw[:12] == V4_MAPPED else raw[:8]
