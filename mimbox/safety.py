"""Who may use the converter and where it may connect: the converter is never an open relay.

Destinations are decided by an ordered list of rules, first match wins (the core, native/core/admit.c,
applies the same list; tests/test_core.py checks they agree, rule by rule):

    1. this host's own addresses                       denied (refreshed from netlink while running)
    2. NEVER: 0/8, loopback, link-local, multicast,    denied, whatever the configuration says
       240/4 and broadcast
    3. --deny-destination PREFIX[:PORTS]               denied
    4. --allow-destination PREFIX[:PORTS]              allowed
    5. DEFAULT_DENY: RFC 1918, CGNAT 100.64/10,        denied unless step 4 allowed them
       benchmarking 198.18/15, the documentation and
       IETF blocks, and port 25 (SMTP) everywhere
    6. anything else (public unicast)                  allowed

So by default the converter relays only to public unicast destinations on any port but 25; a
deployment opens what it needs, e.g. `--allow-destination 10.0.0.0/8` (any port) or
`--allow-destination 192.0.2.0/24:80,443,8000-8080`.
"""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field

from mimbox.config import SafetyConfig, local_addresses, local_subnets
from mimbox.synpath import Cause

DENIED_PORT0, DENIED_OWN = -2, -1   # a denied destination's detail (else the index of the rule); as in C

# Never a destination, whatever the configuration says.
NEVER = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
# Not a destination unless --allow-destination opens it (IANA special-purpose blocks, and SMTP).
DEFAULT_DENY = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24",
                "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
                "0.0.0.0/0:25")
BUILTIN_DENY = NEVER          # (the name tests and older callers use)

MEMO_SIZE = 4096
_UNKNOWN = object()
ALL_PORTS = (1, 65535)


@dataclass(frozen=True)
class Rule:
    """Destinations in `net` on ports ports[0]..ports[1] are allowed or denied."""
    allow: bool
    net: ipaddress.IPv4Network
    ports: tuple[int, int] = ALL_PORTS
    origin: str = ""            # where it comes from, for log lines: "built-in", "--allow-destination", ...

    def matches(self, d: int, port: int) -> bool:
        return d & int(self.net.netmask) == int(self.net.network_address) and self.ports[0] <= port <= self.ports[1]

    def __str__(self) -> str:
        ports = "" if self.ports == ALL_PORTS else (
            f":{self.ports[0]}" if self.ports[0] == self.ports[1] else f":{self.ports[0]}-{self.ports[1]}")
        return f"{self.net}{ports}"


def parse_destination(text: str, allow: bool, origin: str = "") -> list[Rule]:
    """'10.0.0.0/8' / '192.0.2.1:80,443' / '0.0.0.0/0:8000-8080' -> rules (one per port range);
    ValueError with the reason for anything else."""
    net_text, sep, ports_text = text.strip().partition(":")
    try:
        net = ipaddress.IPv4Network(net_text, strict=False)
    except ValueError as e:
        raise ValueError(f"{text!r}: not an IPv4 prefix ({e})") from None
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


def destination_rules(cfg: SafetyConfig) -> list[Rule]:
    """The ordered rules of the module's docstring (steps 2-5) for a configuration."""
    rules = [r for n in NEVER for r in parse_destination(n, False, "never")]
    rules += [r for n in cfg.deny_dst for r in parse_destination(n, False, "--deny-destination")]
    rules += [r for n in cfg.allow_dst for r in parse_destination(n, True, "--allow-destination")]
    rules += [r for n in DEFAULT_DENY for r in parse_destination(n, False, "default")]
    return rules


@dataclass
class Policy:
    """Decides on (client, destination); `refusal()` returns None, or the cause and its detail."""
    allow_clients: list[ipaddress.IPv4Network]
    rules: list[Rule]
    own: set[ipaddress.IPv4Address] = field(default_factory=set)

    @classmethod
    def from_config(cls, cfg: SafetyConfig) -> "Policy":
        allow = cfg.allow_clients or tuple(local_subnets())
        return cls(allow_clients=[ipaddress.IPv4Network(n, strict=False) for n in allow],
                   rules=destination_rules(cfg),
                   own={ipaddress.IPv4Address(a) for a in local_addresses()})

    def __post_init__(self):
        # integer (network, mask) pairs: the check runs for every SYN
        self._allow = [(int(n.network_address), int(n.netmask)) for n in self.allow_clients]
        self._own = {int(a) for a in self.own}
        self._memo: dict = {}

    def set_own(self, addrs) -> bool:
        """This host's addresses changed (netlink): True if they did."""
        own = {ipaddress.IPv4Address(a) for a in addrs}
        if own == self.own:
            return False
        self.own = own
        self._own = {int(a) for a in own}
        self._memo.clear()
        return True

    def refusal(self, client: str, dst: str, dport: int) -> tuple[Cause, str] | None:
        """None if `client` may reach dst:dport through the converter, else (cause, the log line's
        detail). Decisions are remembered until this host's addresses change (bounded memory)."""
        r = self.decide(client, dst, dport)
        return None if r is None else (r[0], self.wording(r[0], r[1], client, dst, dport))

    def decide(self, client: str, dst: str, dport: int) -> tuple[Cause, int] | None:
        """None, or (cause, detail) as the core returns them (native/core/admit.c): for a denied
        destination the detail is DENIED_PORT0, DENIED_OWN or the index of the rule that denies it."""
        key = (client, dst, dport)
        r = self._memo.get(key, _UNKNOWN)
        if r is _UNKNOWN:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            r = self._memo[key] = self._decide(client, dst, dport)
        return r

    def _decide(self, client: str, dst: str, dport: int) -> tuple[Cause, int] | None:
        c = int.from_bytes(socket.inet_aton(client), "big")
        d = int.from_bytes(socket.inet_aton(dst), "big")
        if not any(c & m == n for n, m in self._allow):
            return Cause.CLIENT_NOT_ALLOWED, 0
        if dport == 0:
            return Cause.DESTINATION_DENIED, DENIED_PORT0
        if d in self._own:
            return Cause.DESTINATION_DENIED, DENIED_OWN
        for i, r in enumerate(self.rules):
            if r.matches(d, dport):
                return None if r.allow else (Cause.DESTINATION_DENIED, i)
        return None

    def wording(self, cause: Cause, detail: int, client: str, dst: str, dport: int) -> str:
        """The log line's reason for a policy refusal, from its cause and detail (decided once, by
        the core or by decide(): never decided again to be worded)."""
        if cause is Cause.CLIENT_NOT_ALLOWED:
            return f"client {client} not in allowed prefixes"
        if detail == DENIED_PORT0:
            return "destination port 0"
        if detail == DENIED_OWN:
            return f"destination {dst} is the converter itself"
        if 0 <= detail < len(self.rules):
            r = self.rules[detail]
            how = "always" if r.origin == "never" else (
                "by default; --allow-destination opens it" if r.origin == "default" else r.origin)
            return f"destination {dst}:{dport} denied ({r}, {how})"
        return f"destination {dst}:{dport} denied"

    def describe(self) -> str:
        def listed(allow: bool, origin: str) -> str:
            return ", ".join(str(r) for r in self.rules if r.allow == allow and r.origin == origin) or "-"
        return (f"allowed clients: {', '.join(map(str, self.allow_clients))}; destinations: never "
                f"{listed(False, 'never')} or this host's addresses; denied {listed(False, '--deny-destination')}; "
                f"allowed {listed(True, '--allow-destination')}; denied by default "
                f"{listed(False, 'default')}; every other public unicast destination allowed")


class AddressWatch:
    """Netlink news of this namespace's IPv4 addresses (RTMGRP_IPV4_IFADDR): the converter never
    relays to itself, including to an address added while it runs. `fileno()` for the event loop;
    `changed()` drains the news and says whether to read the addresses again."""
    RTMGRP_IPV4_IFADDR = 0x10

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
                                  socket.NETLINK_ROUTE)
        self.sock.bind((0, self.RTMGRP_IPV4_IFADDR))

    def fileno(self) -> int:
        return self.sock.fileno()

    def changed(self) -> bool:
        news = False
        while True:
            try:
                news |= bool(self.sock.recv(65536))
            except BlockingIOError:
                return news
            except OSError:          # ENOBUFS: news were lost; read the addresses anyway
                return True

    def close(self) -> None:
        self.sock.close()
