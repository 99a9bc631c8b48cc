"""Test oracles: Python statements of what the core decides, held against it (tests/test_core.py,
tests/unit/test_decisions.py). Not the product: the converter decides in C (native/core/admit.c)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from mimbox.codes import DENIED_OWN, Cause
from mimbox.converter.safety import Policy
from mimbox.wire.addrs import as_int, prefix_ints

MEMO_SIZE = 4096
_UNKNOWN = object()


@dataclass
class PolicyOracle(Policy):
    """mimbox.converter.safety.Policy with step 1 of its rules, this host's own destinations (which the core reads
    from the kernel), and decisions remembered until they change (bounded), as a Python converter
    would need them."""
    own: set = field(default_factory=set)
    own_nets: list = field(default_factory=list)        # AnyIP: shorter local routes

    def __post_init__(self):
        self._memo: dict = {}

    def set_own(self, addrs, nets=()) -> bool:
        """This host's own destinations changed: addresses and shorter local routes; True if they did."""
        own = {ipaddress.ip_address(a) for a in addrs}
        own_nets = sorted({ipaddress.ip_network(n) for n in nets}, key=lambda n: (n.version, n))
        if own == self.own and own_nets == sorted(self.own_nets, key=lambda n: (n.version, n)):
            return False
        self.own, self.own_nets = own, own_nets
        self._memo.clear()
        return True

    def decide(self, client: str, dst: str, dport: int) -> tuple[Cause, int] | None:
        key = (client, dst, dport)
        r = self._memo.get(key, _UNKNOWN)
        if r is _UNKNOWN:
            if len(self._memo) >= MEMO_SIZE:
                self._memo.clear()
            r = self._memo[key] = self._decide(client, dst, dport)
        return r

    def _decide(self, client: str, dst: str, dport: int) -> tuple[Cause, int] | None:
        first = Policy.decide(self, client, dst, dport)
        if first is not None and (first[0] is Cause.CLIENT_NOT_ALLOWED or dport == 0):
            return first
        d = as_int(dst)
        if d in {as_int(a) for a in self.own} or any(d & m == n for n, m in map(prefix_ints, self.own_nets)):
            return Cause.DESTINATION_DENIED, DENIED_OWN
        return first

    def refusal(self, client: str, dst: str, dport: int) -> tuple[Cause, str] | None:
        """None if `client` may reach dst:dport, else (cause, the log line's detail)."""
        r = self.decide(client, dst, dport)
        return None if r is None else (r[0], self.wording(r[0], r[1], client, dst, dport))
