"""Delay line: hold packets queued by NFQUEUE and release them at arrival + delay, in order.

This replaces sch_netem's delay and loss on kernels without netem. One process serves one
direction of one link: it is started inside the receiving host's namespace, bound to the
NFQUEUE that the link's ingress rule feeds. Loss is decided here with a seeded RNG so a run
can be replayed.

    python -m topologies.delayline --queue 3 --delay-ms 10 --loss 1.0 --seed 7

SIGUSR1 makes it print `passed=N dropped=M` on stdout (what it let through and dropped so far).
"""
from __future__ import annotations

import argparse
import ctypes
import random
import select
import signal
import socket
import sys
import time
from collections import deque

from netfilterqueue import COPY_META, NetfilterQueue

PR_SET_PDEATHSIG = 1
SO_TIMESTAMP = 29  # asm-generic/socket.h


def die_with_parent() -> None:
    """Ask the kernel to kill us when the process that started us dies (no orphans after a crash)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class DelayLine:
    """FIFO of (release time, packet); a constant delay keeps order without a heap."""

    def __init__(self, queue_num: int, delay_s: float, loss: float, seed: int, max_len: int = 20000):
        # Any socket asking for SO_TIMESTAMP makes the kernel stamp every received skb on arrival
        # (a global static key); NFQUEUE then hands us that stamp, so the time this process takes
        # to wake up is not added to the delay.
        self._stamp_socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._stamp_socket.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMP, 1)
        self._wall_to_mono = time.monotonic() - time.time()
        self.lateness = 0.0  # EWMA of how late we wake up for a deadline; we wake that much earlier
        self.delay = delay_s
        self.loss = loss / 100.0
        self.rng = random.Random(seed)
        self.held: deque = deque()
        self.dropped = 0
        self.passed = 0
        self.nfq = NetfilterQueue()
        # COPY_META: the verdict needs only the packet id, never the payload.
        self.nfq.bind(queue_num, self._arrive, max_len=max_len, mode=COPY_META, sock_len=8 << 20)
        self.fd = self.nfq.get_fd()

    def _arrive(self, pkt) -> None:
        if self.loss and self.rng.random() < self.loss:
            pkt.drop()
            self.dropped += 1
            return
        if self.delay <= 0:
            pkt.accept()
            self.passed += 1
            return
        ts = pkt.get_timestamp()
        arrival = ts + self._wall_to_mono if ts else time.monotonic()
        self.held.append((arrival + self.delay, pkt))

    def _release_due(self) -> None:
        now = time.monotonic()
        held = self.held
        if held and held[0][0] <= now + self.lateness:
            # learn how late select() returns, so the next wake-up can be scheduled earlier
            late = max(0.0, now - (held[0][0] - self.lateness))
            self.lateness = min(0.9 * self.lateness + 0.1 * late, 0.5e-3)
        # the release itself (accept -> reinjection) takes a few microseconds: release a hair early
        while held and held[0][0] <= now + self.lateness:
            held.popleft()[1].accept()
            self.passed += 1

    def serve(self, stop) -> None:
        """Run until stop() is true."""
        fd = self.fd
        while not stop():
            timeout = None
            if self.held:
                timeout = max(0.0, self.held[0][0] - self.lateness - time.monotonic())
            # select() takes a microsecond timeout (epoll rounds up to milliseconds).
            readable, _, _ = select.select([fd], [], [], 0.5 if timeout is None else min(timeout, 0.5))
            if readable:
                self.nfq.run(block=False)
            self._release_due()
        for _, pkt in self.held:  # let in-flight packets through on shutdown
            pkt.accept()
        self.nfq.unbind()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queue", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--loss", type=float, default=0.0, help="percent of packets dropped")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    die_with_parent()
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    line = DelayLine(a.queue, a.delay_ms / 1000.0, a.loss, a.seed)
    # SIGUSR1: print the counters (the reliability suite counts the drops it really made)
    signal.signal(signal.SIGUSR1, lambda *_: print(f"passed={line.passed} dropped={line.dropped}", flush=True))
    print("ready", flush=True)  # the link waits for this before traffic may flow
    line.serve(lambda: bool(stopping))
    print(f"passed={line.passed} dropped={line.dropped}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
