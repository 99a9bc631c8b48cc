"""The front router's health check: a converter whose service port stops answering leaves the VIP's
nexthop group (and comes back when it answers again).

A dead box is dropped by the kernel itself (its link goes down and the nexthop with it); a crashed
converter on a live box is not: the router would keep hashing new connections to a port that
refuses them. This is the small checker a front tier runs for that (in production a routing
daemon withdrawing the VIP plays this part). The group is resilient, so rewriting its member list
moves only the removed member's hash buckets.

    python -m topologies.healthcheck --group 1000 --port 7000 --member 1=10.0.201.1 --member 2=10.0.202.1

Prints one JSON line per change ({"t": ..., "down": [ids]}) and runs until killed.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time


def answers(addr: str, port: int, timeout: float) -> bool:
    """True when a TCP handshake with addr:port completes within `timeout`."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False


def set_group(group: int, members: list[int], group_args: list[str]) -> None:
    if not members:
        return      # the kernel refuses an empty group: keep the last one rather than route nowhere
    subprocess.run(["ip", "nexthop", "replace", "id", str(group), "group", "/".join(map(str, members)),
                    *group_args], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group", type=int, required=True, help="nexthop group id of the VIP's route")
    ap.add_argument("--group-args", default="type resilient buckets 128",
                    help="how the group is declared (kept on every rewrite)")
    ap.add_argument("--member", action="append", required=True, metavar="NHID=ADDR",
                    help="nexthop id and the converter address to probe")
    ap.add_argument("--port", type=int, required=True, help="the converters' service port")
    ap.add_argument("--interval", type=float, default=0.05, help="seconds between probe rounds")
    ap.add_argument("--fails", type=int, default=2, help="failed probes in a row before a member is removed")
    a = ap.parse_args(argv)
    members = [(int(i), addr) for i, addr in (m.split("=", 1) for m in a.member)]
    misses = {i: 0 for i, _ in members}
    down: set[int] = set()
    print(json.dumps({"t": time.time(), "watching": [i for i, _ in members]}), flush=True)
    while True:
        t0 = time.monotonic()
        changed = False
        for i, addr in members:
            ok = answers(addr, a.port, timeout=a.interval)
            misses[i] = 0 if ok else misses[i] + 1
            if ok and i in down:
                down.discard(i)
                changed = True
            elif misses[i] >= a.fails and i not in down:
                down.add(i)
                changed = True
        if changed:
            set_group(a.group, [i for i, _ in members if i not in down], a.group_args.split())
            print(json.dumps({"t": time.time(), "down": sorted(down)}), flush=True)
        time.sleep(max(0.0, a.interval - (time.monotonic() - t0)))


if __name__ == "__main__":
    sys.exit(main())
