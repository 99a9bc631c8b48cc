"""Fig. 6 — goodput vs per-socket memory on the mobile topology (§4.4), download and upload.

The converter host's tcp_rmem/tcp_wmem maximum is set to each size (the paper's method); the
baseline is the direct path (no converter, end-to-end MPTCP, default buffers). Also the paper's
untested idea: a smaller server-facing buffer (`mimbox run --server-rcvbuf/--server-sndbuf`) in
download, and the memory it saves per connection.
"""
from __future__ import annotations

import sys

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import fidelity_rows, mean_ci, progress, run_experiment, testbed  # noqa: E402
from experiments.measure.tools import iperf3  # noqa: E402
from experiments.systems import MiMBox, Router  # noqa: E402
from topologies.testbed import MobileTopo  # noqa: E402

NAME = "fig6_buffers"
KB = 1024
FULL = dict(sizes=[16 * KB, 32 * KB, 64 * KB, 128 * KB, 200 * KB, 512 * KB, 1024 * KB], reps=3, seconds=20,
            server_side=32 * KB)
QUICK = dict(sizes=[16 * KB, 64 * KB, 200 * KB, 1024 * KB], reps=1, seconds=8, server_side=32 * KB)
PAPER_KB = 200          # smallest per-socket buffer reaching full goodput in the paper
PAPER_CONNS_8GB = 20_000
PORT = 5201


def set_converter_buffers(tb, size: int) -> None:
    """The converter host's tcp_rmem/tcp_wmem maximum (restored by the testbed on a remote host)."""
    for key in ("tcp_rmem", "tcp_wmem"):
        tb.sysctl(tb.mbox, f"net.ipv4.{key}", f"4096 {min(size, 87380 if key == 'tcp_rmem' else 16384)} {size}")


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows = []
    with testbed(MobileTopo()) as tb:
        # (measuring the shaped links takes ~1 min: a tiny run may leave it to tests/test_testbed.py)
        fidelity = fidelity_rows(tb, seconds=2.0) if params.get("fidelity", True) else "not measured (fidelity=False)"
        half = params["server_side"] // 2          # setsockopt(v) gives 2v of kernel memory
        convs = {"mimbox": MiMBox(mode="explicit"),
                 "mimbox, small server side": MiMBox(mode="explicit",
                                                     extra=["--server-rcvbuf", str(half),
                                                            "--server-sndbuf", str(half)])}
        tcp_srv = servers.iperf3(tb, PORT, mptcp=False)
        mptcp_srv = servers.iperf3(tb, PORT + 1, mptcp=True)
        try:
            for c in convs.values():
                c.start(tb, PORT)
            for rep in range(params["reps"]):
                for direction, reverse in (("download", True), ("upload", False)):
                    r = iperf3(tb, Router(), PORT + 1, params["seconds"], reverse=reverse, cpus=None)
                    rows.append(dict(system="direct (no converter)", direction=direction, buffer=float("nan"),
                                     server_side_buffer=float("nan"), rep=rep, goodput_mbps=r["goodput_bps"] / 1e6))
                    progress(f"fig6 rep {rep} {direction} direct: {r['goodput_bps'] / 1e6:.2f} Mbit/s")
                    for size in params["sizes"]:
                        set_converter_buffers(tb, size)
                        for name, conv in convs.items():
                            if name != "mimbox" and direction == "upload":
                                continue
                            r = iperf3(tb, conv, PORT, params["seconds"], reverse=reverse, cpus=None)
                            server_side = params["server_side"] if name != "mimbox" else size
                            rows.append(dict(system=name, direction=direction, buffer=size,
                                             server_side_buffer=server_side, rep=rep,
                                             goodput_mbps=r["goodput_bps"] / 1e6))
                            progress(f"fig6 rep {rep} {direction} {name} {size // KB} KB: "
                                     f"{r['goodput_bps'] / 1e6:.2f} Mbit/s")
        finally:
            for c in convs.values():
                c.stop()
            tcp_srv.stop()
            mptcp_srv.stop()
            set_converter_buffers(tb, 6 << 20)
    return pd.DataFrame(rows), {"link_fidelity": fidelity}


def findings(df: pd.DataFrame) -> dict:
    """Smallest buffer reaching 95 % of the direct goodput, and what fits in 8 GB at that size."""
    out = {}
    for direction in ("download", "upload"):
        base = df[(df.direction == direction) & (df.system == "direct (no converter)")].goodput_mbps.mean()
        m = df[(df.direction == direction) & (df.system == "mimbox")].groupby("buffer").goodput_mbps.mean()
        ok = m[m >= 0.95 * base]
        size = int(ok.index.min()) if len(ok) else None
        out[direction] = {"direct_mbps": base, "smallest_buffer_95pct": size,
                          "connections_in_8GB": int(8 * 2**30 // (2 * size)) if size else None}
    small = df[(df.direction == "download") & (df.system == "mimbox, small server side")]
    if len(small) and out["download"]["smallest_buffer_95pct"]:
        s = out["download"]["smallest_buffer_95pct"]
        g = small[small.buffer == s].goodput_mbps.mean()
        per_conn = s + int(small.server_side_buffer.iloc[0])
        out["download_small_server_side"] = {
            "client_side": s, "server_side": int(small.server_side_buffer.iloc[0]), "goodput_mbps": g,
            "memory_per_connection": per_conn, "saved_vs_symmetric": 1 - per_conn / (2 * s),
            "connections_in_8GB": int(8 * 2**30 // per_conn)}
    return out


def plot(df: pd.DataFrame):
    from experiments.style import legend_outside, styles
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    fig.subplots_adjust(wspace=0.25)
    style = styles(df[df.system != "direct (no converter)"].system)
    for ax, direction in zip(axes, ("download", "upload")):
        d = df[df.direction == direction]
        base = d[d.system == "direct (no converter)"].goodput_mbps
        ax.axhline(base.mean(), color="k", ls="--", label="direct, no converter")
        for name, g in d[d.system != "direct (no converter)"].groupby("system", sort=False):
            st = g.groupby("buffer").goodput_mbps.apply(lambda v: mean_ci(v)).apply(pd.Series)
            ax.errorbar(st.index / KB, st[0], yerr=st[1], capsize=3, label=name, **style[name])
        ax.axvline(PAPER_KB, color="gray", ls=":", label=f"paper: {PAPER_KB} KB enough")
        ax.set_xscale("log")
        ax.set_xlabel("per-socket buffer on the converter [KB]")
        ax.set_ylabel("goodput [Mbit/s]")
        ax.set_title(f"Fig. 6: {direction} (WiFi + 3G)", fontsize=9)
        ax.grid(alpha=.3, which="both")
    legend_outside(fig, axes)
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
