"""How a held SYN tells the converter its server: explicit (DST_OPT), transparent (TPROXY), static.

Each redirector answers `destination(syn) -> (addr, port)` or raises OptionError with the reason
the SYN is refused; the relay does the rest the same way for every mode.
"""
from __future__ import annotations

from mimbox.config import ListenerConfig
from mimbox.dstopt import OptionError, Syn


class Explicit:
    """The paper's mode: the client's stack put the real server in DST_OPT (see mimbox.dstopt)."""
    name = "explicit"

    def destination(self, syn: Syn) -> tuple[str, int]:
        o = syn.options
        if o.dst is None:
            raise OptionError(f"bad DST_OPT: {o.dst_error}" if o.dst_error else "no DST_OPT in SYN")
        return o.dst.addr, o.dst.port


class Transparent:
    """On the path: the SYN was addressed to the server itself and TPROXY diverted it to us."""
    name = "transparent"

    def destination(self, syn: Syn) -> tuple[str, int]:
        return syn.dst, syn.dport


class Static:
    """One fixed server per listener, like the paper's hard-coded user-space converters."""
    name = "static"

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream

    def destination(self, syn: Syn) -> tuple[str, int]:
        return self.upstream


class Convert:
    """RFC 8803 (mimbox.redirect.convert): no SYN is read, the destination is the stream's first bytes."""
    name = "convert"

    def destination(self, syn: Syn) -> tuple[str, int]:
        raise OptionError("convert mode reads its Connect TLV after accept(), not from the SYN")


def for_listener(lc: ListenerConfig):
    """The redirector of a listener's mode."""
    if lc.mode == "convert":
        return Convert()
    if lc.mode == "explicit":
        return Explicit()
    if lc.mode == "transparent":
        return Transparent()
    return Static(lc.upstream)
