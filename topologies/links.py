"""Link emulation that works with or without sch_netem.

`EmuLink` is used exactly like Mininet's `TCLink`: `bw=` (Mbit/s), `delay=` ('10ms'), `loss=` (percent),
`max_queue_size=` (packets), with `params1`/`params2` for asymmetric links (each side's parameters
shape what that side *sends*). Where the kernel has sch_netem it simply is a TCLink. Where it does
not (this project's CI kernel), each direction is built from parts the kernel does have:

    sender egress:    HTB class at `bw`  ->  pfifo of `max_queue_size` packets   (the bottleneck queue)
    receiver ingress: raw/PREROUTING -> NFQUEUE -> topologies.delayline          (propagation delay, loss;
                                                                                  IPv4 and IPv6)

A constant delay commutes with a FIFO queue, so delaying at the receiver's ingress gives the same
end-to-end timing as netem's delay after the queue; doing it at ingress (not at the sender's
egress) keeps held packets out of the sending socket's TCP Small Queues budget.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass

from mininet.link import Intf, Link, TCIntf
from mininet.log import info

from mimbox.host.kernel import qdisc_works

DEFAULT_QUEUE_PACKETS = 1000


def parse_delay_ms(delay) -> float:
    """'10ms' / '1.5ms' / '200us' / '0.01s' / 10 (ms) -> milliseconds."""
    if delay is None:
        return 0.0
    if isinstance(delay, (int, float)):
        return float(delay)
    m = re.fullmatch(r"\s*([0-9.]+)\s*(us|ms|s)?\s*", str(delay))
    if not m:
        raise ValueError(f"bad delay {delay!r}: use e.g. '10ms'")
    value, unit = float(m.group(1)), m.group(2) or "ms"
    return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]


@dataclass(frozen=True)
class LinkShape:
    """What one direction of a link does to the packets its sender puts on it."""
    bw: float | None = None          # Mbit/s, None = unshaped
    delay_ms: float = 0.0            # one-way propagation delay
    loss: float = 0.0                # percent, random, seeded
    max_queue_size: int | None = None
    seed: int = 1

    @property
    def shaped(self) -> bool:
        return self.bw is not None or self.delay_ms > 0 or self.loss > 0 or self.max_queue_size is not None

    def describe(self) -> str:
        parts = []
        if self.bw is not None:
            parts.append(f"{self.bw:g}Mbit")
        if self.delay_ms:
            parts.append(f"{self.delay_ms:g}ms delay")
        if self.loss:
            parts.append(f"{self.loss:g}% loss")
        return " ".join(parts) or "unshaped"


def netem_available() -> bool:
    """True when this kernel has sch_netem (probed once, by trying)."""
    if os.environ.get("MIMBOX_FORCE_FALLBACK"):
        return False
    return qdisc_works("netem")


class EmuIntf(TCIntf):
    """A TCIntf whose delay and loss do not need sch_netem (see module doc)."""

    shape = LinkShape()
    delay_line = None

    def config(self, bw=None, delay=None, jitter=None, loss=None, max_queue_size=None, seed=1,
               gro=False, txo=True, rxo=True, **params):
        """Configure addresses (like Intf) and the shaping of what this interface sends."""
        self.shape = LinkShape(bw=bw, delay_ms=parse_delay_ms(delay), loss=float(loss or 0),
                               max_queue_size=max_queue_size, seed=seed)
        if netem_available():
            return TCIntf.config(self, bw=bw, delay=delay, jitter=jitter, loss=loss,
                                 max_queue_size=max_queue_size, gro=gro, txo=txo, rxo=rxo, **params)
        if jitter:
            raise ValueError("jitter needs sch_netem, which this kernel lacks")
        result = Intf.config(self, **params)
        if not self.shape.shaped:
            return result
        # One wire packet per skb, so the rate, the queue and the loss count real packets.
        self.cmd("ethtool -K", self, "tso off gso off gro off")
        tcoutput = self.tc("%s qdisc show dev %s")
        cmds = [] if ("priomap" in tcoutput or "noqueue" in tcoutput) else ["%s qdisc del dev %s root"]
        parent = " root "
        if bw is not None:
            bwcmds, parent = self.bwCmds(bw=bw)
            cmds += bwcmds
        if bw is not None or max_queue_size is not None:
            cmds.append("%s qdisc add dev %s" + parent + "handle 10: pfifo limit "
                        + str(max_queue_size or DEFAULT_QUEUE_PACKETS))
        info("(" + self.shape.describe() + ") ")
        outputs = (self.tc(c) for c in cmds)
        errors = [line for out in outputs for line in out.strip().splitlines() if not line.startswith("Warning")]
        if errors:
            raise RuntimeError(f"tc on {self}: {errors}")
        return result

    def peer(self) -> "EmuIntf":
        """The interface at the other end of this link."""
        return self.link.intf2 if self.link.intf1 is self else self.link.intf1

    def start_delay_line(self) -> None:
        """Delay/drop what this interface sends, at the peer's ingress (fallback path only)."""
        s = self.shape
        if netem_available() or (s.delay_ms <= 0 and s.loss <= 0):
            return
        peer = self.peer()
        node = peer.node
        queue = node.ports[peer]
        self.delay_line = node.popen(
            [sys.executable, "-m", "topologies.delayline", "--queue", str(queue),
             "--delay-ms", str(s.delay_ms), "--loss", str(s.loss), "--seed", str(s.seed)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = self.delay_line.stdout.readline().strip()
        if ready != "ready":
            err = self.delay_line.stderr.read()
            raise RuntimeError(f"delay line for {self} -> {peer} did not start: {err}")
        for tables in ("iptables", "ip6tables"):   # both families ride the link: both are delayed
            out = node.cmd(f"{tables} -w -t raw -A PREROUTING -i {peer} -j NFQUEUE --queue-num {queue}")
            if out.strip():
                raise RuntimeError(f"{tables} on {node}: {out}")

    def dropped(self) -> int:
        """Packets this direction's emulation dropped so far (delay line's counter, or netem's)."""
        import select
        import signal as _signal
        p = self.delay_line
        if p is None:
            if self.shape.loss <= 0:
                return 0
            out = self.node.cmd(f"tc -s qdisc show dev {self}")    # netem counts its drops
            m = re.search(r"qdisc netem .*?dropped (\d+)", out, re.S)
            return int(m.group(1)) if m else 0
        p.send_signal(_signal.SIGUSR1)
        if not select.select([p.stdout], [], [], 5.0)[0]:
            raise RuntimeError(f"delay line of {self} did not report its counters")
        m = re.fullmatch(r"passed=(\d+) dropped=(\d+)", p.stdout.readline().strip())
        if not m:
            raise RuntimeError(f"delay line of {self}: unexpected report")
        return int(m.group(2))

    def stop_delay_line(self) -> None:
        """Stop this direction's delay process (its ingress rule goes with the namespace)."""
        p, self.delay_line = self.delay_line, None
        if p is None:
            return
        peer = self.peer()
        if peer.node.shell:
            for tables in ("iptables", "ip6tables"):
                peer.node.cmd(f"{tables} -w -t raw -D PREROUTING -i {peer} -j NFQUEUE "
                              f"--queue-num {peer.node.ports.get(peer, 0)} 2>/dev/null")
        p.terminate()
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def delete(self):
        """Stop the delay line, then delete the interface as Mininet does."""
        self.stop_delay_line()
        super().delete()


class EmuLink(Link):
    """Drop-in replacement for TCLink: bw/delay/loss/max_queue_size, with or without netem."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls1", EmuIntf)
        kwargs.setdefault("cls2", EmuIntf)
        Link.__init__(self, *args, **kwargs)
        try:
            self.intf1.start_delay_line()
            self.intf2.start_delay_line()
        except Exception:
            self.stop()
            raise

    def stop(self):
        """Stop both delay lines (Mininet calls this from net.stop())."""
        for intf in (self.intf1, self.intf2):
            if isinstance(intf, EmuIntf):
                intf.stop_delay_line()
        super().stop()
