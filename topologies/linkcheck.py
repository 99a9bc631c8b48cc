"""Measure what each emulated link really does, and compare it with what it was asked to do.

For each direction of each link of a started Testbed:
  rate  iperf3 TCP from one end to the other; the sender interface's tx bytes (whole frames, what
        HTB meters) over a steady window give the wire rate;
  rtt   `ping -U` (user-to-user time: the delay line acts after the kernel's receive timestamp);
  loss  iperf3 UDP with >= 5000 datagrams below the link rate (only where loss is configured).

Tolerances (from the testbed issue): rate within 5 %, RTT within 1 ms, loss within 0.3 points.
"""
from __future__ import annotations

import json
import re
import subprocess
from dataclasses import asdict, dataclass

RATE_TOL = 0.05
RTT_TOL_MS = 1.0
LOSS_TOL_PP = 0.3


@dataclass
class Fidelity:
    """One measured direction of one link (sender -> receiver)."""
    link: str
    sender: str
    receiver: str
    rate_mbps_set: float | None
    rate_mbps: float
    rtt_ms_set: float
    rtt_ms: float
    loss_pct_set: float
    loss_pct: float | None
    loss_packets: int

    def problems(self) -> list[str]:
        """What is out of tolerance (empty when the link is faithful)."""
        out = []
        if self.rate_mbps_set is not None and abs(self.rate_mbps / self.rate_mbps_set - 1) > RATE_TOL:
            out.append(f"{self.link} rate {self.rate_mbps:.3f} vs {self.rate_mbps_set:g} Mbit/s")
        if abs(self.rtt_ms - self.rtt_ms_set) > RTT_TOL_MS:
            out.append(f"{self.link} rtt {self.rtt_ms:.2f} vs {self.rtt_ms_set:g} ms")
        if self.loss_pct is not None and abs(self.loss_pct - self.loss_pct_set) > LOSS_TOL_PP:
            out.append(f"{self.link} loss {self.loss_pct:.2f} vs {self.loss_pct_set:g} %")
        return out

    def row(self) -> dict:
        return asdict(self)


def _tx_bytes(proc_net_dev: str, intf: str) -> int:
    for line in proc_net_dev.splitlines():
        if line.strip().startswith(intf + ":"):
            return int(line.split(":", 1)[1].split()[8])
    raise KeyError(intf)


def wait_listening(node, port: int, timeout_s: float = 5.0) -> None:
    """Wait until something in node listens on TCP `port` (without connecting to it)."""
    out = node.cmd(f"for i in $(seq {int(timeout_s / 0.02)}); do ss -Hltn 'sport = :{port}' | grep -q . && "
                   f"echo up && break; sleep 0.02; done")
    if "up" not in out:
        raise RuntimeError(f"nothing listens on {node}:{port}")


def measure_rate(a, a_intf, b, b_ip: str, a_ip: str, seconds: float = 3.0, port: int = 5301) -> float:
    """Wire rate (Mbit/s) of a_intf while iperf3 pushes TCP from a to b."""
    server = b.popen(["iperf3", "-s", "-1", "-B", b_ip, "-p", str(port)])
    try:
        wait_listening(b, port)
        client = a.popen(["iperf3", "-c", b_ip, "-B", a_ip, "-p", str(port), "-t", str(seconds + 1.5), "-J"])
        try:
            warm = 1.0  # slow start and HTB's initial burst are not the link's rate
            out = a.cmd(f"sleep {warm}; cat /proc/net/dev; date +%s.%N; sleep {seconds}; "
                        f"cat /proc/net/dev; date +%s.%N")
            parts = re.split(r"^(\d+\.\d+)\s*$", out, flags=re.M)
            t0, t1 = float(parts[1]), float(parts[3])
            tx0, tx1 = _tx_bytes(parts[0], str(a_intf)), _tx_bytes(parts[2], str(a_intf))
        finally:
            client.wait(timeout=seconds + 30)
    finally:
        server.wait(timeout=10)
    return (tx1 - tx0) * 8 / (t1 - t0) / 1e6


def measure_rtt(a, b_ip: str, a_ip: str, count: int = 20) -> float:
    """Average user-to-user ping RTT (ms) from a_ip to b_ip."""
    out = a.cmd(f"ping -U -q -c {count} -i 0.05 -s 16 -I {a_ip} {b_ip}")
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not m:
        raise RuntimeError(f"ping {a_ip} -> {b_ip} failed: {out}")
    return float(m.group(1))


def measure_loss(a, b, b_ip: str, a_ip: str, rate_mbps: float | None, packets: int,
                 port: int = 5302, tries: int = 3) -> float:
    """Percent of UDP datagrams lost from a to b, offered at half the link rate. iperf3's own TCP
    control connection crosses the same lossy link and now and then times out: tried again then."""
    for attempt in range(tries):
        try:
            return _measure_loss_once(a, b, b_ip, a_ip, rate_mbps, packets, port)
        except RuntimeError:
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


def _measure_loss_once(a, b, b_ip: str, a_ip: str, rate_mbps: float | None, packets: int, port: int) -> float:
    payload, wire = 16, 16 + 8 + 20 + 14  # UDP + IPv4 + Ethernet headers: HTB meters whole frames
    offered = 0.5 * (rate_mbps or 50.0) * payload / wire
    server = b.popen(["iperf3", "-s", "-1", "-B", b_ip, "-p", str(port)])
    try:
        wait_listening(b, port)
        out = a.cmd(f"iperf3 -u -c {b_ip} -B {a_ip} -p {port} -l {payload} -b {offered:.4f}M -k {packets} -J")
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:   # the client gave up: do not leave the one-off server behind
            server.kill()
            server.wait()
    result = json.loads(out[out.index("{"):])
    if "error" in result:
        raise RuntimeError(f"iperf3 UDP {a_ip} -> {b_ip}: {result['error']}")
    summary = result["end"]["sum"]
    return 100.0 * summary["lost_packets"] / max(1, summary["packets"])


def check_testbed(tb, seconds: float = 3.0, loss_packets: int = 5000) -> list[Fidelity]:
    """Measure every direction of every link of a started Testbed."""
    rows = []
    for link in tb.net.links:
        for snd, rcv in ((link.intf1, link.intf2), (link.intf2, link.intf1)):
            s, r = snd.shape, rcv.shape
            a_ip, b_ip = snd.IP(), rcv.IP()
            rate = measure_rate(snd.node, snd, rcv.node, b_ip, a_ip, seconds)
            rtt = measure_rtt(snd.node, b_ip, a_ip)
            loss = None
            if s.loss:
                loss = measure_loss(snd.node, rcv.node, b_ip, a_ip, s.bw, loss_packets)
            rows.append(Fidelity(link=f"{snd}->{rcv}", sender=str(snd), receiver=str(rcv),
                                 rate_mbps_set=s.bw, rate_mbps=rate,
                                 rtt_ms_set=s.delay_ms + r.delay_ms, rtt_ms=rtt,
                                 loss_pct_set=s.loss, loss_pct=loss,
                                 loss_packets=loss_packets if s.loss else 0))
    return rows


def format_table(rows: list[Fidelity]) -> str:
    """A plain-text table of the measurements, one line per direction."""
    lines = [f"{'direction':<28} {'rate set':>9} {'rate':>9} {'rtt set':>8} {'rtt':>8} {'loss set':>8} "
             f"{'loss':>6}  verdict"]
    for f in rows:
        bad = f.problems()
        lines.append(f"{f.link:<28} {f.rate_mbps_set if f.rate_mbps_set is not None else '-':>9} "
                     f"{f.rate_mbps:>9.3f} {f.rtt_ms_set:>8.2f} {f.rtt_ms:>8.2f} {f.loss_pct_set:>8.2f} "
                     f"{'-' if f.loss_pct is None else format(f.loss_pct, '.2f'):>6}  "
                     f"{'OK' if not bad else 'OFF: ' + '; '.join(bad)}")
    return "\n".join(lines)
