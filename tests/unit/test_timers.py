"""The relay's own timers (mimbox/timers.py), without root or sockets. The core's timers (held SYNs,
connections) are in tests/test_core.py."""
from __future__ import annotations

from types import SimpleNamespace as NS

from mimbox.timers import Timeouts, due

T = Timeouts(connect=10, handshake=15, idle=300, prefix_wait=0.2)


def test_greetings_time_out_after_the_handshake_timeout():
    g = NS(t=10.0)
    assert due(T, 24.0, [g]).greetings == []
    assert due(T, 26.0, [g]).greetings == [g]
