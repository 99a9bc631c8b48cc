"""Who may use the converter and where it may connect: the converter is never an open relay.

Destinations are decided by an ordered list of rules, first match wins (the core, native/core/admit.c,
applies the same list; tests/test_core.py checks they agree, rule by rule):

    1. this host's own destinations: what the kernel's  denied (refreshed from netlink while running;
       local table routes as local (every address,    while they cannot be listed, every destination
       and AnyIP's `ip route add local PREFIX`)       is denied)
    2. NEVER: 0/8, loopback, link-local, multicast,    denied, whatever the configuration says
       240/4 and broadcast; ::1, ::/96, fe80::/10,
       ff00::/8
    3. --deny-destination PREFIX[:PORTS]               denied
    4. --allow-destination PREFIX[:PORTS]              allowed
    5. DEFAULT_DENY: RFC 1918, CGNAT 100.64/10,        denied unless step 4 allowed them
       benchmarking 198.18/15, the documentation and
       IETF blocks; unique local fc00::/7, site-local,
       documentation, benchmarking, discard, and the
       prefixes that embed an IPv4 address (NAT64,
       6to4, Teredo); port 25 (SMTP) everywhere
    6. anything else (public unicast)                  allowed

Both families are one address space here as in the core: an IPv4 address is its IPv4-mapped IPv6
form ::ffff:a.b.c.d, so an IPv4 rule also judges the mapped form a client may name instead (an RFC 8803
Connect carries every address as 128 bits). So by default the converter relays only to public unicast
destinations on any port but 25; a deployment opens what it needs, e.g. `--allow-destination
10.0.0.0/8` (any port), `--allow-destination 192.0.2.0/24:80,443,8000-8080` or
`--allow-destination [fd00::/8]:443`.
"""
from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

from mimbox.codes import (  # noqa: F401 - a denied destination's detail
    DENIED_OWN,
    DENIED_OWN_UNKNOWN,
    DENIED_PORT0,
    Cause,
)
from mimbox.config import SafetyConfig, hostport, local_subnets
from mimbox.wire.addrs import as_int, prefix_ints

# Never a destination, whatever the configuration says.
NEVER = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
         "::1/128", "::/96", "fe80::/10", "ff00::/8")      # (::/96: unspecified, IPv4-compatible)
# Not a destination unless --allow-destination opens it (IANA special-purpose blocks, and SMTP).
DEFAULT_DENY = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
                "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
                "fc00::/7", "fec0::/10", "2001:db8::/32", "2001:2::/48", "100::/64",
                "64:ff9b::/96", "64:ff9b:1::/48", "2002::/16", "2001::/32",    # NAT64, 6to4, Teredo
                "0.0.0.0/0:25", "[::/0]:25")
BUILTIN_DENY = NEVER          # (the name tests and older callers use)

ALL_PORTS = (1, 65535)


@dataclass(frozen=True)
class Rule:
    """Destinations in `net` (IPv4 or IPv6) on ports ports[0]..ports[1] are allowed or denied."""
    allow: bool
    net: ipaddress.IPv4Network | ipaddress.IPv6Network
    ports: tuple[int, int] = ALL_PORTS
    origin: str = ""            # where it comes from, for log lines: "built-in", "--allow-destination", ...

    def __str__(self) -> str:
        ports = "" if self.ports == ALL_PORTS else (
            f":{self.ports[0]}" if self.ports[0] == self.ports[1] else f":{self.ports[0]}-{self.ports[1]}")
        return f"[{self.net}]{ports}" if ports and self.net.version == 6 else f"{self.net}{ports}"


def parse_destination(text: str, allow: bool, origin: str = "") -> list[Rule]:
    """'10.0.0.0/8' / '192.0.2.1:80,443' / '0.0.0.0/0:8000-8080' / '2001:db8::/32' /
    '[2001:db8::/32]:443' -> rules (one per port range); ValueError with the reason for anything else."""
    t = text.strip()
    if t.startswith("["):
        net_text, close, rest = t[1:].partition("]")
        sep, ports_text = rest[:1], rest[1:]
        if not close or rest and sep != ":":
            raise ValueError(f"{text!r}: write an IPv6 prefix with ports as [PREFIX]:PORTS")
    elif t.count(":") > 1:
        net_text, sep, ports_text = t, "", ""          # an IPv6 prefix without ports
    else:
        net_text, sep, ports_text = t.partition(":")
    try:
        if "%" in net_text:
            raise ValueError("a scoped (link-local) address is never a destination")
        net = ipaddress.ip_network(net_text, strict=False)
    except ValueError as e:
        raise ValueError(f"{text!r}: not an IPv4 or IPv6 prefix ({e})") from None
    if not sep:
        return [Rule(allow, net, ALL_PORTS, origin)]
    rules = []
    for part in ports_text.split(","):
        lo, dash, hi = part.strip().partition("-")
        try:
            a, b = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ValueError(f"{text!r}: ports must be N, N-M or a comma-separated list of them") from None
        if not 1 <= a <= b <= 65535:
            raise ValueError(f"{text!r}: port range {a}-{b} is not within 1-65535")
        rules.append(Rule(allow, net, (a, b), origin))
    return rules


def destination_rules(cfg: SafetyConfig, upstream: tuple[str, int] | None = None) -> list[Rule]:
    """The ordered rules of the module's docstring (steps 2-5) for a configuration. upstream: static
    mode's server, which the operator named: allowed (after --deny-destination, which still wins)."""
    rules = [r for n in NEVER for r in parse_destination(n, False, "never")]
    rules += [r for n in cfg.deny_dst for r in parse_destination(n, False, "--deny-destination")]
    if upstream is not None:
        rules += [Rule(True, ipaddress.ip_network(upstream[0]), (upstream[1], upstream[1]), "--upstream")]
    rules += [r for n in cfg.allow_dst for r in parse_destination(n, True, "--allow-destination")]
    rules += [r for n in DEFAULT_DENY for r in parse_destination(n, False, "default")]
    return rules


@dataclass
class Policy:
    """Who may go where, as the core is given it (mimbox.converter.core.Core.policy): the allowed client prefixes
    and the ordered destination rules. The core decides for every connection (native/core/admit.c);
    this class words its refusals for the log and judges static mode's one upstream at start."""
    allow_clients: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    rules: list[Rule]

    @classmethod
    def from_config(cls, cfg: SafetyConfig, upstream: tuple[str, int] | None = None) -> "Policy":
        """The policy of a configuration; upstream: static mode's server (allowed unless denied)."""
        allow = cfg.allow_clients or collapsed(local_subnets())
        return cls(allow_clients=[ipaddress.ip_network(n, strict=False) for n in allow],
                   rules=destination_rules(cfg, upstream))    # (own destinations: the core reads them)

    def static_refusal(self, upstream: tuple[str, int]) -> str | None:
        """Static mode: why every connection would be refused (the upstream is denied), or None."""
        r = self.decide(str(self.allow_clients[0].network_address) if self.allow_clients else "::1",
                        upstream[0], upstream[1])
        if r is None or r[0] is Cause.CLIENT_NOT_ALLOWED:
            return None
        return self.wording(r[0], r[1], "", upstream[0], upstream[1])

    def decide(self, client: str, dst: str, dport: int) -> tuple[Cause, int] | None:
        """None, or (cause, detail) as the core returns them for client -> dst:dport by the prefixes and
        rules alone (the core also refuses this host's own destinations: DENIED_OWN); for a denied
        destination the detail is DENIED_PORT0 or the index of the rule that denies it."""
        c, d = as_int(client), as_int(dst)
        if not any(c & m == n for n, m in map(prefix_ints, self.allow_clients)):
            return Cause.CLIENT_NOT_ALLOWED, 0
        if dport == 0:
            return Cause.DESTINATION_DENIED, DENIED_PORT0
        for i, r in enumerate(self.rules):
            n, m = prefix_ints(r.net)
            if d & m == n and r.ports[0] <= dport <= r.ports[1]:
                return None if r.allow else (Cause.DESTINATION_DENIED, i)
        return None

    def wording(self, cause: Cause, detail: int, client: str, dst: str, dport: int) -> str:
        """The log line's reason for a policy refusal, from its cause and detail (decided once, by
        the core: never decided again to be worded)."""
        if cause is Cause.CLIENT_NOT_ALLOWED:
            return f"client {client} not in allowed prefixes"
        if detail == DENIED_PORT0:
            return "destination port 0"
        if detail == DENIED_OWN:
            return f"destination {dst} is the converter itself"
        if detail == DENIED_OWN_UNKNOWN:
            return "this host's own addresses could not be listed: every destination is refused until they are"
        if 0 <= detail < len(self.rules):
            r = self.rules[detail]
            how = "always" if r.origin == "never" else (
                "by default; --allow-destination opens it" if r.origin == "default" else r.origin)
            return f"destination {hostport(dst, dport)} denied ({r}, {how})"
        return f"destination {hostport(dst, dport)} denied"

    def describe(self) -> str:
        def listed(allow: bool, origin: str) -> str:
            return ", ".join(str(r) for r in self.rules if r.allow == allow and r.origin == origin) or "-"
        return (f"allowed clients: {', '.join(map(str, self.allow_clients))}; destinations: never "
                f"{listed(False, 'never')} or this host's addresses; denied {listed(False, '--deny-destination')}; "
                f"allowed {listed(True, '--allow-destination')}; denied by default "
                f"{listed(False, 'default')}; every other public unicast destination allowed")


def collapsed(nets) -> list[str]:
    """Prefixes without repeats or prefixes inside others, per family (a host with 300 addresses in
    one subnet allows that subnet once)."""
    parsed = [ipaddress.ip_network(n, strict=False) for n in nets]
    return [str(n) for v in (4, 6) for n in ipaddress.collapse_addresses(p for p in parsed if p.version == v)]


class AddressWatch:
    """Netlink news of this namespace's addresses and local routes (RTMGRP_IPV4/IPV6_IFADDR and
    _ROUTE): the converter never relays to itself, including to an address or AnyIP route added
    while it runs. `fileno()` for the event loop; `changed()` drains the news and says whether one
    of them concerns this host's own destinations (an address, or a route of the local table:
    a router's other route changes do not make it list them again)."""
    RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40
    RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
    RTM_NEWADDR, RTM_DELADDR, RTM_NEWROUTE, RTM_DELROUTE = 20, 21, 24, 25
    RT_TABLE_LOCAL, RTN_LOCAL = 255, 2

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, self.RTMGRP_IPV4_IFADDR | self.RTMGRP_IPV6_IFADDR | self.RTMGRP_IPV4_ROUTE
                        | self.RTMGRP_IPV6_ROUTE))

    def fileno(self) -> int:
        return self.sock.fileno()

    def changed(self) -> bool:
        news = False
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return news
            except OSError:          # ENOBUFS: news were lost; read the addresses anyway
                return True
            news |= self.concerns_own(data)

    @classmethod
    def concerns_own(cls, data: bytes) -> bool:
        """Whether a datagram of netlink news may change this host's own destinations: an address
        message, or a route of the local table. Only the headers are read (struct nlmsghdr, then
        struct rtmsg's table and type bytes), so a router's route churn costs little here."""
        off = 0
        while off + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, off)
            if kind in (cls.RTM_NEWADDR, cls.RTM_DELADDR):
                return True
            if kind in (cls.RTM_NEWROUTE, cls.RTM_DELROUTE) and off + 24 <= len(data):
                table, rtype = data[off + 16 + 4], data[off + 16 + 7]     # rtm_table, rtm_type
                if table == cls.RT_TABLE_LOCAL or rtype == cls.RTN_LOCAL:
                    return True
            if length < 16:
                return False
            off += (length + 3) & ~3
        return False

    def close(self) -> None:
        self.sock.close()
