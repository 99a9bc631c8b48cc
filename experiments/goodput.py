"""Fig. 4 — goodput vs MSS: bulk client -> server transfer through each converter and the router.

Topology: the paper's testbed (Fig. 3). The MSS is set by the MTU of every interface (MTU = MSS + 40)
and checked on the wire (the SYN's MSS option). Segmentation offloads are off so that a segment
is a packet, as the paper's per-segment argument assumes; one more point at MSS 1460 with
TSO/GSO on shows the converters when segments are batched as on real NICs. End hosts on one core, the converter on
the other; the converter's CPU time per GB is recorded beside each goodput (its CPU box's counter).

Two regimes (`regime` column), as in Fig. 5: converter-bound (each converter held to the same CPU
quota, experiments.common.CONVERTER_QUOTA_CORES; the router, unlimited, checked >= 2x the best
converter at each point) and end-host-bound (no quota: the end hosts' core caps every system).
"""
from __future__ import annotations

import re
import sys

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import (  # noqa: E402
    CONVERTER_CPUS,
    CONVERTER_QUOTA_CORES,
    END_HOST_CPUS,
    bound_check,
    conversion,
    fidelity_rows,
    interleave,
    mean_ci,
    mptcp_mib,
    pick,
    progress,
    run_experiment,
    running,
)
from experiments.measure.tools import iperf3  # noqa: E402
from experiments.systems import HAProxy, MiMBox, Naive, Router  # noqa: E402
from topologies.regimes import CONVERTER_BOUND, END_HOST_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "fig4_goodput"
FULL = dict(mss={END_HOST_BOUND: [128, 256, 512, 768, 1024, 1460], CONVERTER_BOUND: [128, 256, 512, 768, 1024, 1460]},
            reps=5, seconds=10, offload_point=True, quota_cores=CONVERTER_QUOTA_CORES)
QUICK = dict(mss={END_HOST_BOUND: [128, 512, 1024, 1460], CONVERTER_BOUND: [256, 1460]},
             reps=3, seconds=2, offload_point=True, quota_cores=CONVERTER_QUOTA_CORES)
SERVER_PORT = 5201


def systems() -> list:
    return [Router(), MiMBox(mode="explicit", cpus=CONVERTER_CPUS), Naive("readwrite", cpus=CONVERTER_CPUS),
            Naive("splice", cpus=CONVERTER_CPUS), HAProxy(threads=1, mode="tcp", cpus=CONVERTER_CPUS)]


def set_offloads(tb, on: bool) -> None:
    for host in (tb.client, tb.mbox, tb.server):
        for intf in host.intfList():
            if str(intf) != "lo":
                host.cmd(f"ethtool -K {intf} tso {'on' if on else 'off'} gso {'on' if on else 'off'} gro off")


def set_mss(tb, mss: int) -> None:
    for host in (tb.client, tb.mbox, tb.server):
        for intf in host.intfList():
            if str(intf) != "lo":
                host.cmd(f"ip link set dev {intf} mtu {mss + 40}")


def syn_mss_on_wire(tb, system) -> int:
    """The MSS option of the client's SYN, read from a capture on the client's first interface."""
    cap = tb.client.popen(["tcpdump", "-c", "1", "-nn", "-v", "-i", "client-eth0",
                           "tcp[tcpflags] & tcp-syn != 0 and tcp[tcpflags] & tcp-ack == 0"],
                          stdout=-1, stderr=-1, text=True)
    tb.client.cmd("sleep 0.3")
    try:
        iperf3(tb, system, SERVER_PORT + 1, None, nbytes="1M", cpus=END_HOST_CPUS)
        out, _ = cap.communicate(timeout=5)
    finally:
        if cap.poll() is None:
            cap.kill()
            cap.wait()
    m = re.search(r"mss (\d+)", out)
    return int(m.group(1)) if m else -1


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    """Topology -> runs -> tidy rows (one per measurement), both regimes."""
    rows, regimes = [], {}
    with Testbed(PaperTopo()) as tb:
        fidelity = fidelity_rows(tb, seconds=1.0)
        tcp_server = servers.iperf3(tb, SERVER_PORT, mptcp=False, cpus=END_HOST_CPUS)
        mptcp_server = servers.iperf3(tb, SERVER_PORT + 1, mptcp=True, cpus=END_HOST_CPUS)
        wire_mss: dict = {}
        try:
            for regime, mss_list in params["mss"].items():
                syss = pick(systems(), params)
                with running(tb, syss, regime, params["quota_cores"], SERVER_PORT) as regimes[regime]:
                    rows += _measure(tb, syss, regime, mss_list, params, wire_mss)
        finally:
            tcp_server.stop()
            mptcp_server.stop()
            set_offloads(tb, False)
    return pd.DataFrame(rows), {"link_fidelity": fidelity, "regimes": regimes}


def _measure(tb, syss: list, regime: str, mss_list: list[int], params: dict, wire_mss: dict) -> list[dict]:
    # the MSS sweep with offloads off (a segment is a packet), then, with offloads on, the
    # 1460-byte point again: what a converter costs when segments are batched as on real NICs
    rows = []
    points = [(mss, False) for mss in mss_list]
    if params.get("offload_point"):
        points.append((1460, True))
    for rep in range(params["reps"]):
        for mss, offload in points:
            set_offloads(tb, offload)
            set_mss(tb, mss)
            if (mss, offload) not in wire_mss:
                wire_mss[(mss, offload)] = syn_mss_on_wire(tb, syss[0])
            for s in interleave(syss, rep):
                port = SERVER_PORT + 1 if isinstance(s, Router) else SERVER_PORT
                c0, mib0 = s.cpu_s(), mptcp_mib(tb.mbox)
                r = iperf3(tb, s, port, params["seconds"], cpus=END_HOST_CPUS)
                cpu, mib = s.cpu_s() - c0, conversion(mib0, mptcp_mib(tb.mbox))
                gb = r["bytes"] / 1e9
                rows.append(dict(regime=regime, system=s.name, loops=s.loops, mss=mss, offload=offload,
                                 wire_mss=wire_mss[(mss, offload)], rep=rep, goodput_gbps=r["goodput_bps"] / 1e9, **mib,
                                 bytes=r["bytes"], converter_cpu_s=cpu if s.converts else float("nan"),
                                 cpu_s_per_gb=cpu / gb if s.converts and gb else float("nan")))
                progress(f"fig4 {regime} rep {rep} mss {mss}{' TSO/GSO' if offload else ''} {s.name}: "
                         f"{r['goodput_bps'] / 1e9:.2f} Gbit/s")
    return rows


def findings(df: pd.DataFrame) -> dict:
    """Whether the converter-bound regime was that (router >= 2x the best converter at each MSS)."""
    return {"bound_check": bound_check(df[~df.offload], "goodput_gbps", key="mss")}


def plot(df: pd.DataFrame):
    """Goodput vs MSS with 95 % CI error bars, converter CPU s/GB below; one column per regime."""
    if "offload" not in df:
        df = df.assign(offload=False)
    if "regime" not in df:
        df = df.assign(regime=END_HOST_BOUND)
    regimes = [r for r in (CONVERTER_BOUND, END_HOST_BOUND) if r in set(df.regime)]
    fig, axes = plt.subplots(2, len(regimes), figsize=(6.4 * len(regimes), 6.4), sharex=True, squeeze=False,
                             gridspec_kw=dict(height_ratios=[2, 1]))
    from experiments.style import few_reps_warning, legend_outside, styles
    style = styles(df["system"])
    for col, regime in enumerate(regimes):
        ax, ax2 = axes[0][col], axes[1][col]
        for name, g in df[df.regime == regime].groupby("system", sort=False):
            sweep, tso = g[~g.offload], g[g.offload]
            stats = sweep.groupby("mss")["goodput_gbps"].apply(lambda v: mean_ci(v)).apply(pd.Series)
            ax.errorbar(stats.index, stats[0], yerr=stats[1], capsize=3, label=name, **style[name])
            color = style[name]["color"]
            if len(tso):
                m, ci = mean_ci(tso.goodput_gbps)
                ax.errorbar([1560], [m], yerr=[ci], marker="s", capsize=3, color=color, ls="none")
            cpu = sweep.groupby("mss")["cpu_s_per_gb"].mean()
            if cpu.notna().any():
                ax2.plot(cpu.index, cpu.values, marker=style[name]["marker"], label=name, color=color)
                if len(tso):
                    ax2.plot([1560], [tso.cpu_s_per_gb.mean()], marker="s", color=color, ls="none")
        ax.plot([], [], "ks", ls="none", label="MSS 1460, TSO/GSO on (right)")
        ax.set_ylabel("goodput [Gbit/s]")
        ax.set_title(regime + (" (each converter: same CPU quota)" if regime == CONVERTER_BOUND else
                               " (no quota)"), fontsize=9)
        ax.grid(alpha=.3)
        ax2.set_xlabel("MSS [bytes]")
        ax2.set_ylabel("converter CPU [s/GB]")
        ax2.grid(alpha=.3)
    fig.suptitle("Fig. 4: goodput vs MSS (paper: MiMBox close to the router, above user-space converters)",
                 fontsize=9)
    legend_outside(fig, axes[0])
    few_reps_warning(fig, int(df.groupby(["regime", "system", "mss", "offload"]).size().min()))
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
