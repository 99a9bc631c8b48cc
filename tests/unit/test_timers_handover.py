"""The relay's timers and worker hand-over decisions (mimbox/timers.py, mimbox/handover.py), without
root or sockets. The core's timers (held SYNs, connections) are in tests/test_core.py."""
from __future__ import annotations

from types import SimpleNamespace as NS

from mimbox.handover import owner_elsewhere
from mimbox.netfilter import worker_of_port
from mimbox.timers import Timeouts, due

T = Timeouts(connect=10, handshake=15, idle=300, prefix_wait=0.2)


def test_greetings_time_out_after_the_handshake_timeout():
    g = NS(t=10.0)
    assert due(T, 24.0, [g]).greetings == []
    assert due(T, 26.0, [g]).greetings == [g]


def test_hand_over_only_what_another_worker_held():
    workers = 4
    addr = ("10.0.1.1", 0x1234)
    owner = worker_of_port(addr[1], workers)
    other = (owner + 1) % workers
    assert owner_elsewhere(addr, owner, workers, True, held=None) is None          # ours
    assert owner_elsewhere(addr, other, workers, True, held=None) == owner        # theirs
    assert owner_elsewhere(addr, other, workers, True, held={addr}) == owner      # theirs, and held
    assert owner_elsewhere(addr, other, workers, True, held=set()) is None        # not held: serve here
    assert owner_elsewhere(addr, other, workers, False, held=None) is None        # no SYN is queued
    assert owner_elsewhere(addr, 0, 1, True, held=None) is None                   # one worker
