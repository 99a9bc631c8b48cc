"""Addresses of both families, as the converter holds them (the Python side of native/core/addr.h):
one 128-bit space, an IPv4 address as its IPv4-mapped form ::ffff:a.b.c.d (RFC 4291 2.5.5.2) — the
form a dual-stack listener's accept() returns and an RFC 8803 Connect carries. So one policy, one
gate and one wire format serve both families.

    packed("10.0.0.1")   -> 16 bytes (the core's and RFC 8803's form)
    text(raw16)          -> "10.0.0.1" / "2001:db8::1"
    prefix("10.0.0.0/8") -> (16 bytes, 104): a length over the 16 bytes
    as_int(addr), prefix_ints(net) -> the same as integers (mimbox.safety's policy)
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
