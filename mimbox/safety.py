"""Who may use the converter and where it may connect: the converter is never an open relay."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from mimbox.config import SafetyConfig, local_addresses, local_subnets

# Never a destination, whatever the configuration says.
BUILTIN_DENY = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
                "255.255.255.255/32")


@dataclass
class Policy:
    """Decides on (client, destination); `refusal()` returns None or the reason for the log line."""
    allow_clients: list[ipaddress.IPv4Network]
    deny: list[ipaddress.IPv4Network]
    own: set[ipaddress.IPv4Address]

    @classmethod
    def from_config(cls, cfg: SafetyConfig) -> "Policy":
        allow = cfg.allow_clients or tuple(local_subnets())
        return cls(allow_clients=[ipaddress.IPv4Network(n, strict=False) for n in allow],
                   deny=[ipaddress.IPv4Network(n, strict=False) for n in (*BUILTIN_DENY, *cfg.deny_dst)],
                   own={ipaddress.IPv4Address(a) for a in local_addresses()})

    def refusal(self, client: str, dst: str, dport: int) -> str | None:
        c, d = ipaddress.IPv4Address(client), ipaddress.IPv4Address(dst)
        if not any(c in n for n in self.allow_clients):
            return f"client {client} not in allowed prefixes"
        if d in self.own:
            return f"destination {dst} is the converter itself"
        for n in self.deny:
            if d in n:
                return f"destination {dst} denied ({n})"
        if dport == 0:
            return "destination port 0"
        return None

    def describe(self) -> str:
        return (f"allowed clients: {', '.join(map(str, self.allow_clients))}; "
                f"denied destinations: {', '.join(map(str, self.deny))} + this host's addresses")
