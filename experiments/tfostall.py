"""Kernel check for RFC 8803 mode: does a download over MPTCP stall when the SYN carried data?

Convert mode puts the Convert message in the SYN's data (TCP Fast Open). On this machine an MPTCP
client's connection to an MPTCP listener that accepted SYN data stalled for about one
retransmission timeout on larger downloads. This measures it on loopback, in a namespace of its
own: download time by size, for MPTCP or TCP on each side, with and without SYN data (the
`--no-fastopen` client sends its first bytes after the handshake instead). One function, no
converter: the kernel alone.
"""
from __future__ import annotations

import json
import subprocess
import sys

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import run_experiment  # noqa: E402
from topologies.support import scratch_netns  # noqa: E402

NAME = "tfo_stall"
STALL_MS = 100      # a download this slow on loopback waited for a retransmission timeout
KB = 1024
QUICK = dict(sizes=[16 * KB, 64 * KB, 128 * KB, 192 * KB, 256 * KB, 1024 * KB], reps=10)
FULL = dict(sizes=[16 * KB, 64 * KB, 96 * KB, 128 * KB, 160 * KB, 192 * KB, 256 * KB, 1024 * KB], reps=30)
CASES = [("mptcp", "mptcp", True), ("mptcp", "mptcp", False), ("tcp", "tcp", True), ("mptcp", "tcp", True),
         ("tcp", "mptcp", True)]

# runs inside the namespace: one listener, `reps` downloads of `size` bytes per case, times in ms
PROBE = r"""
import json, socket, sys, threading, time
from mimbox.converter.convert import TCP_FASTOPEN_NO_COOKIE, fastopen_server, prepare_listener
sizes, reps, cases = json.loads(sys.argv[1])
proto = {"mptcp": 262, "tcp": 0}
out = []
with fastopen_server():
    for client, server, syn_data in cases:
        ls = socket.socket(2, 1, proto[server]); ls.setsockopt(1, 2, 1)
        prepare_listener(ls, 64, require_cookie=False); ls.bind(("127.0.0.1", 0)); ls.listen(64)
        want = {}
        def serve():
            while True:
                c, _ = ls.accept(); c.recv(16); c.sendall(b"x" * want["n"]); c.close()
        threading.Thread(target=serve, daemon=True).start()
        for size in sizes:
            want["n"] = size
            for _ in range(reps):
                s = socket.socket(2, 1, proto[client]); s.setsockopt(6, TCP_FASTOPEN_NO_COOKIE, 1)
                t = time.perf_counter()
                if syn_data:
                    s.sendto(b"GET", 0x20000000, ls.getsockname())
                else:
                    s.connect(ls.getsockname()); s.send(b"GET")
                n = 0
                while (b := s.recv(1 << 16)):
                    n += len(b)
                out.append(dict(client=client, server=server, syn_data=syn_data, size=size, bytes=n,
                                ms=1e3 * (time.perf_counter() - t)))
                s.close()
print(json.dumps(out))
"""


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    with scratch_netns("mimbox-tfostall") as ns:
        arg = json.dumps([params["sizes"], params["reps"], CASES])
        p = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", PROBE, arg], capture_output=True,
                           text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(p.stderr[-2000:])
    df = pd.DataFrame(json.loads(p.stdout))
    return df, {"namespace": "own, loopback only"}


def label(r) -> str:
    return f"{r['client']} client → {r['server']} listener, " + ("SYN data" if r["syn_data"] else "data after handshake")


def findings(df: pd.DataFrame) -> dict:
    """Median download time per case and size; where the MPTCP-with-SYN-data case stalls."""
    med = df.groupby(["client", "server", "syn_data", "size"])["ms"].median()
    out = {f"{c}->{s} {'syn-data' if d else 'no-syn-data'}": {int(k): round(v, 2) for k, v in g.droplevel([0, 1, 2]).items()}
           for (c, s, d), g in med.groupby(level=[0, 1, 2])}
    stalled = med.loc[("mptcp", "mptcp", True)]
    out["smallest_stalled_size"] = int(stalled[stalled > STALL_MS].index.min()) if (stalled > STALL_MS).any() else None
    share = df.assign(stalled=df["ms"] > STALL_MS).groupby(["client", "server", "syn_data"])["stalled"].mean()
    out["stalled_share"] = {f"{c}->{s} {'syn-data' if d else 'no-syn-data'}": round(float(v), 3)
                            for (c, s, d), v in share.items()}
    out["complete"] = bool((df["bytes"] == df["size"]).all())
    return out


def plot(df: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, g in df.groupby(["client", "server", "syn_data"], sort=False):
        m = g.groupby("size")["ms"].median()
        ax.plot(m.index / KB, m.values, marker="o", label=label(dict(zip(("client", "server", "syn_data"), key))))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("download [KB]")
    ax.set_ylabel("median time [ms], loopback")
    ax.set_title("MPTCP with TCP Fast Open SYN data on this kernel", fontsize=9)
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=7)
    return fig


def problems(df: pd.DataFrame) -> list[str]:
    bad = df[df["bytes"] != df["size"]]
    return [f"{label(r)} {r['size']} B: {r['bytes']} received" for _, r in bad.iterrows()]


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this check (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)

