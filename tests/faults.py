"""Faults, injected and counted: each helper makes the fault happen, checks that it took effect,
and only then records it in the ledger (README's "faults injected" is this count)."""
from __future__ import annotations

import contextlib
import re
import subprocess

import ledger


def link_down(host, intf: str) -> None:
    """Take a link down (a phone losing its WiFi)."""
    host.cmd(f"ip link set {intf} down")
    state = host.cmd(f"cat /sys/class/net/{intf}/operstate").strip()
    assert state == "down", f"{intf} is {state!r}, not down"
    ledger.fault("link down")


def kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL processes (a crash: nothing of theirs runs after it)."""
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()
    ledger.fault("process killed", sum(p.returncode == -9 for p in procs))


@contextlib.contextmanager
def blackhole(host, chain: str, match: str):
    """Drop the packets `match` selects in iptables `chain` while inside; counts the packets the rule
    really dropped (a vanished peer, a server that never answers)."""
    host.cmd(f"iptables -w -I {chain} 1 {match} -j DROP")
    try:
        yield
    finally:
        out = host.cmd(f"iptables -w -vxnL {chain} 1")   # the rule we inserted first: packets, bytes
        host.cmd(f"iptables -w -D {chain} {match} -j DROP")
        m = re.match(r"\s*(\d+)\s+\d+\s+DROP", out)
        ledger.fault("packets black-holed", int(m.group(1)) if m else 0)


@contextlib.contextmanager
def lossy_links(tb):
    """Count the packets the testbed's loss emulation drops while inside."""
    before = tb.dropped_packets()
    yield
    ledger.fault("packets dropped by the links", tb.dropped_packets() - before)


def offloads_off(hosts) -> None:
    """Segmentation and checksum offloads off on every interface of `hosts` (checked with ethtool)."""
    for host in hosts:
        for intf in host.intfList():
            if str(intf) == "lo":
                continue
            host.cmd(f"ethtool -K {intf} tso off gso off gro off tx off rx off")
            k = host.cmd(f"ethtool -k {intf}")
            assert re.search(r"tcp-segmentation-offload: off", k), k
            ledger.fault("interface with offloads off")
