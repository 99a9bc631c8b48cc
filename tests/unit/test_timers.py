"""The relay's own timers (mimbox/converter/timers.py), without root or sockets. The core's timers (held SYNs,
connections) are in tests/test_core.py."""
from __future__ import annotations

from types import SimpleNamespace as NS

from mimbox.converter.timers import Timeouts, due

T = Timeouts(connect=10, handshake=15, idle=300, prefix_wait=0.2)


def test_greetings_time_out_after_the_handshake_timeout():
    g = NS(t=10.0, counted=True, reply=None, buf=b"\x01")      # a part of its message came
    assert due(T, 24.0, [g]).greetings == []
    assert due(T, 26.0, [g]).greetings == [g]


def test_a_silent_greeting_is_due_after_the_silence_timeout():
    """Issue 36 finding 3: a client that connected and sent nothing held its prefix's place for the
    whole handshake timeout. Now only for the silence timeout; one that sent a byte keeps the rest."""
    silent, spoke = NS(t=10.0, counted=True, reply=None, buf=b""), NS(t=10.0, counted=True, reply=None, buf=b"\x01")
    answer = NS(t=10.0, counted=False, reply=b"x", buf=b"")     # an answer waiting: not a greeting's place
    assert due(T, 11.9, [silent]).silent == []
    d = due(T, 12.1, [silent, spoke, answer])
    assert (d.silent, d.greetings) == ([silent], [])
    assert due(T, 26.0, [spoke, answer]).greetings == [spoke, answer]
