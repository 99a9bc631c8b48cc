"""Who may use the converter and where it may connect: the converter is never an open relay."""
from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

from mimbox.config import SafetyConfig, local_addresses, local_subnets
from mimbox.synpath import Cause

# Never a destination, whatever the configuration says.
BUILTIN_DENY = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
                "255.255.255.255/32")


MEMO_SIZE = 4096
_UNKNOWN = object()


@dataclass
class Policy:
    """Decides on (client, destination); `refusal()` returns None, or the cause and its detail."""
    allow_clients: list[ipaddress.IPv4Network]
    deny: list[ipaddress.IPv4Network]
    own: set[ipaddress.IPv4Address]

    @classmethod
    def from_config(cls, cfg: SafetyConfig) -> "Policy":
        allow = cfg.allow_clients or tuple(local_subnets())
        return cls(allow_clients=[ipaddress.IPv4Network(n, strict=False) for n in allow],
                   deny=[ipaddress.IPv4Network(n, strict=False) for n in (*BUILTIN_DENY, *cfg.deny_dst)],
                   own={ipaddress.IPv4Address(a) for a in local_addresses()})

    def __post_init__(self):
        # integer (network, mask) pairs: the check runs for every SYN
        self._allow = [(int(n.network_address), int(n.netmask)) for n in self.allow_clients]
        self._deny = [(int(n.network_address), int(n.netmask), n) for n in self.deny]
        self._own = {int(a) for a in self.own}
        self._memo: dict = {}

    def client_refusal(self, client: str) -> tuple[Cause, str] | None:
        """Only the client check (the destination may not be known yet)."""
        c = int.from_bytes(socket.inet_aton(client), "big")
        if not any(c & m == n for n, m in self._allow):
            return Cause.CLIENT_NOT_ALLOWED, f"client {client} not in allowed prefixes"
        return None

    def refusal(self, client: str, dst: str, dport: int) -> tuple[Cause, str] | None:
        """None if `client` may reach dst:dport through the converter, else (cause, detail).
        Decisions are remembered (the policy does not change while running; bounded memory)."""
        key = (client, dst, dport)
        r = self._memo.get(key, _UNKNOWN)
        if r is _UNKNOWN:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            r = self._memo[key] = self._decide(client, dst, dport)
        return r

    def _decide(self, client: str, dst: str, dport: int) -> tuple[Cause, str] | None:
        c = int.from_bytes(socket.inet_aton(client), "big")
        d = int.from_bytes(socket.inet_aton(dst), "big")
        if not any(c & m == n for n, m in self._allow):
            return Cause.CLIENT_NOT_ALLOWED, f"client {client} not in allowed prefixes"
        if d in self._own:
            return Cause.DESTINATION_DENIED, f"destination {dst} is the converter itself"
        for n, m, net in self._deny:
            if d & m == n:
                return Cause.DESTINATION_DENIED, f"destination {dst} denied ({net})"
        if dport == 0:
            return Cause.DESTINATION_DENIED, "destination port 0"
        return None

    def describe(self) -> str:
        return (f"allowed clients: {', '.join(map(str, self.allow_clients))}; "
                f"denied destinations: {', '.join(map(str, self.deny))} + this host's addresses")
