"""The converter's timers. Once a second the relay asks `due()` what of its own has waited too
long (decided without a socket, unit-tested in tests/unit) and acts on the answer:

    convert message incomplete      > handshake timeout   -> Error TLV "Malformed Message"
    convert client, not a byte yet  > silence timeout     -> reset (a silent crowd holds no place)

and the core (native/core/timers.c; tests/test_core.py) those of the SYNs it holds and
the connections it relays:

    held SYN, server silent         > connect timeout     -> refused (RST to the SYN)
    released SYN, client silent     > handshake timeout   -> its server connection closed
    accepted, server still silent   > connect timeout     -> RST (convert mode: Error TLV)
    convert answer, both silent     > PREFIX_WAIT         -> the answer is sent alone (a client that
                                                             sent bytes gets it with the server's)
    connection without a byte       > idle timeout        -> reset both sides (0: never)
"""
from __future__ import annotations

from dataclasses import dataclass, field

PREFIX_WAIT = 0.2     # convert mode: how long the answer waits for the server's first bytes


@dataclass(frozen=True)
class Timeouts:
    connect: float
    handshake: float
    idle: float
    prefix_wait: float = PREFIX_WAIT
    silence: float = 2.0

    @classmethod
    def of(cls, safety) -> "Timeouts":
        """From a SafetyConfig."""
        return cls(safety.connect_timeout, safety.handshake_timeout, safety.idle_timeout,
                   silence=safety.silence_timeout)


@dataclass
class Due:
    """What has waited too long, by what the relay does about it."""
    greetings: list = field(default_factory=list)            # convert mode: Greeting never complete
    silent: list = field(default_factory=list)               # convert mode: not a byte of it yet


def due(t: Timeouts, now: float, greetings=()) -> Due:
    """`greetings`: Greeting objects (convert mode's messages not yet complete)."""
    d = Due()
    for g in greetings:
        if g.counted and g.reply is None and not g.buf and now - g.t > min(t.silence, t.handshake):
            d.silent.append(g)
        elif now - g.t > t.handshake:
            d.greetings.append(g)
    return d
