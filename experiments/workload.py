"""Fig. 5 — requests/s vs file size: 40 concurrent HTTP clients, a new connection per request.

wrk (weighttp is not packaged) sends `Connection: close` GETs through each system to nginx on the
server (nginx instead of the paper's Apache, so the server is not the bottleneck). The converter's
CPU time per request is recorded too (its CPU box's counter: threads and children included).

Two regimes, in one run (`regime` column):
- converter-bound (the paper's): every converter held to the same CPU quota per event loop
  (quota_cores "auto": calibrated at the start of the run on this machine, at most
  experiments.common.CONVERTER_QUOTA_CORES, so the router keeps >= 2.2x the cheapest converters at
  every size: calibrate_quota), so req/s follows the converter's CPU per request;
  the router path, unlimited, must deliver >= 2x the best converter (checked: findings.bound_check).
  Systems: MiMBox (explicit with DST_OPT, RFC 8803 convert, static), HAProxy 1 thread (http as in
  the paper, and tcp; and http with every socket MPTCP, its server side fallen back to TCP, as the
  earlier runs had it -- every other converter speaks TCP to the server), Squid, the paper's
  splice() and read()/write() converters, MiMBox N workers vs HAProxy N threads.
- end-host-bound: no quota; the end hosts' core caps every system, so equal rates mean
  "not the bottleneck", not "equally fast".
"""
from __future__ import annotations

import os
import sys

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import (  # noqa: E402
    AUTO,
    CONVERTER_CPUS,
    calibrate_quota,
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
    testbed,
    syn_counts,
)
from experiments.measure.tools import wrk  # noqa: E402
from experiments.systems import HAProxy, MiMBox, Naive, Router, Squid  # noqa: E402
from topologies.regimes import CONVERTER_BOUND, END_HOST_BOUND  # noqa: E402
from topologies.testbed import PaperTopo  # noqa: E402

NAME = "fig5_workload"
KB = 1024
FULL = dict(sizes={CONVERTER_BOUND: [1 * KB, 4 * KB, 16 * KB, 64 * KB, 256 * KB, 1024 * KB],
                   END_HOST_BOUND: [1 * KB, 4 * KB, 16 * KB, 64 * KB, 256 * KB, 1024 * KB]},
            reps=5, seconds=10, connections=40, quota_cores=AUTO)
QUICK = dict(sizes={CONVERTER_BOUND: [1 * KB, 16 * KB, 256 * KB], END_HOST_BOUND: [1 * KB, 16 * KB, 1024 * KB]},
             reps=3, seconds=3, connections=40, quota_cores=AUTO)
# The paper's Fig. 5 at 1 KB (requests/s, §4.3 text)
PAPER_1KB = {"mimbox": 22_000, "haproxy-8t": 18_000, "haproxy-1t": 9_500, "squid": 2_500}
HTTP_PORT = 80


def convert_mode(cpus):
    """MiMBox in RFC 8803 mode, the Convert message in TFO SYN data. Not above 64 KB: on this kernel
    an MPTCP connection to an MPTCP listener that took SYN data stalls for one retransmission
    timeout (~200 ms) on downloads past ~128 KB (plain TCP on either side does not), which would
    measure the kernel, not the converter (docs/findings.md, "RFC 8803")."""
    m = MiMBox(mode="convert", cpus=cpus)
    m.max_size = 64 * KB
    return m


def systems(regime: str, tb=None) -> list:
    """One event loop each on the converter's core; then N of them on every core (same count each).
    tb: the testbed they will run on (its converter's cores and pinning; default this machine's)."""
    n = tb.converter_cores if tb is not None else (os.cpu_count() or 2)
    c = (tb.cpus("mbox") if tb is not None else CONVERTER_CPUS) if n == 2 or getattr(tb, "remote", False) else None
    all_cpus = ",".join(str(i) for i in range(n))
    one_loop = [Router(), MiMBox(mode="explicit", cpus=c), HAProxy(threads=1, cpus=c), Squid(cpus=c)]
    if regime == CONVERTER_BOUND:
        one_loop += [MiMBox(mode="static", cpus=c), convert_mode(c),
                     HAProxy(threads=1, mode="tcp", cpus=c), HAProxy(threads=1, server_side="mptcp", cpus=c),
                     Naive("splice", cpus=c), Naive("readwrite", cpus=c)]
    return one_loop + [MiMBox(mode="explicit", cpus=all_cpus, workers=n),
                       HAProxy(threads=n, cpus=all_cpus)]


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows, regimes, syn_paths = [], {}, {}
    with testbed(PaperTopo()) as tb:
        fidelity = fidelity_rows(tb, seconds=1.0)
        web = servers.nginx(tb, sorted({s for v in params["sizes"].values() for s in v}), HTTP_PORT,
                            mptcp=False, cpus=tb.cpus("server"))
        web_mptcp = servers.nginx(tb, sorted({s for v in params["sizes"].values() for s in v}), HTTP_PORT + 1,
                                  mptcp=True, cpus=tb.cpus("server"))
        try:
            for regime, sizes in params["sizes"].items():
                syss = pick(systems(regime, tb), params, tb)
                with running(tb, syss, regime, params["quota_cores"], HTTP_PORT) as regimes[regime]:
                    calibrated(tb, syss, regime, sizes, params, regimes[regime])
                    rows += _measure(tb, syss, regime, sizes, params)
                    syn_paths[regime] = syn_counts(syss)
        finally:
            web.stop()
            web_mptcp.stop()
    return pd.DataFrame(rows), {"link_fidelity": fidelity, "regimes": regimes,
                                "syns_seen_by_mimbox": syn_paths}


# the converters a calibration probes: the ones with the least work per request (the best at every
# size in every committed run), so the router's margin over them holds for the others
CALIBRATE_WITH = ("read/write", "splice", "mimbox-static", "haproxy-1t-tcp")
PROBE_SECONDS = 2


def calibrated(tb, syss: list, regime: str, sizes: list[int], params: dict, box: dict) -> None:
    """quota_cores "auto", converter-bound: calibrate the quota on this machine at these sizes
    (experiments.common.calibrate_quota), every system alike; the manifest's regime says what was probed."""
    if params["quota_cores"] != AUTO or regime != CONVERTER_BOUND:
        return

    def probe(s, size: int) -> float:
        settle(tb)
        port = HTTP_PORT + 1 if isinstance(s, Router) else HTTP_PORT
        return wrk(tb, s, port, f"/{size}.bin", params.get("probe_seconds", PROBE_SECONDS), params["connections"],
                   cpus=tb.cpus("client"))["req_per_s"]

    cal = calibrate_quota(syss, probe, sizes, probe_with=CALIBRATE_WITH)
    box.update(cores_per_loop=cal["cores_per_loop"], quota_us_per_loop=int(cal["cores_per_loop"] * box["period_us"]),
               quota_us={s.name: s.box.quota_us for s in syss if s.box is not None}, calibration=cal)


def _measure(tb, syss: list, regime: str, sizes: list[int], params: dict) -> list[dict]:
    rows = []
    for rep in range(params["reps"]):
        for size in sizes:
            for s in interleave(syss, rep):
                if size > getattr(s, "max_size", size):
                    continue
                port = HTTP_PORT + 1 if isinstance(s, Router) else HTTP_PORT
                settle(tb)
                c0, ends0, mib0 = s.cpu_s(), s.session_ends(), mptcp_mib(tb.mbox)
                r = wrk(tb, s, port, f"/{size}.bin", params["seconds"], params["connections"], cpus=tb.cpus("client"))
                cpu, mib = s.cpu_s() - c0, conversion(mib0, mptcp_mib(tb.mbox))
                ends = {k: n - ends0.get(k, 0) for k, n in s.session_ends().items() if n > ends0.get(k, 0)}
                quota = s.box.cores / s.loops if s.box is not None and s.box.cores is not None else float("nan")
                rows.append(dict(regime=regime, system=s.name, loops=s.loops, size=size, rep=rep, **r, **mib,
                                 quota_cores_per_loop=quota,
                                 peer_ends=" ".join(f"{k}:{n}" for k, n in sorted(ends.items())),
                                 converter_cpu_s=cpu if s.converts else float("nan"),
                                 cpu_us_per_req=1e6 * cpu / r["requests"] if s.converts and r["requests"]
                                 else float("nan")))
                progress(f"fig5 {regime} rep {rep} {size} B {s.name}: {r['req_per_s']:.0f} req/s, "
                         f"{rows[-1]['cpu_us_per_req']:.0f} µs/req ({r['socket_errors']} socket errors)")
    return rows


def settle(tb, timeout: float = 10.0) -> None:
    """Before a measurement: the previous system's accept backlog is empty and its connections to
    the server carry nothing (a slow converter still works through its backlog after the load
    stops; that work, and its MIB counts, must not land in the next system's measurement). A
    connection to the server that is established and idle, both queues empty, is not work: a
    converter that connects before it answers the client (MiMBox's held SYN) keeps one for a
    client wrk gave up on mid-handshake until its handshake timeout (15 s), doing nothing."""
    import time
    deadline = time.monotonic() + timeout
    ports = f"( dport = :{HTTP_PORT} or dport = :{HTTP_PORT + 1} )"
    quiet = None            # empty for 0.2 s: a child accepted just now has had time to connect()
    while time.monotonic() < deadline:
        backlog = [line for line in tb.mbox.cmd("ss -Hltn").splitlines()       # State Recv-Q Send-Q ...
                   if len(line.split()) > 1 and line.split()[1] != "0"]
        conns = [line.split() for line in tb.mbox.cmd(f"ss -Htn state established state syn-sent '{ports}'")
                 .splitlines() if len(line.split()) > 2]                # State Recv-Q Send-Q ...
        busy = backlog or [" ".join(c) for c in conns if c[0] != "ESTAB" or c[1] != "0" or c[2] != "0"]
        now = time.monotonic()
        quiet = None if busy else (quiet or now)
        if quiet is not None and now - quiet >= 0.2:
            return
        time.sleep(0.05)
    progress(f"fig5: connections to the server still open after {timeout:g}s; measuring anyway: "
             + " | ".join(busy)[:300])


def findings(df: pd.DataFrame) -> dict:
    """Whether the converter-bound regime was that (router >= 2x the best converter at each size)."""
    return {"bound_check": bound_check(df, "req_per_s")}


def problems(df: pd.DataFrame) -> list[str]:
    """A peer that drops connections under the figure's load makes the figure invalid."""
    bad = df[(df["socket_errors"] > 0) | (df["non_2xx"] > 0)]
    return [f"{r.regime} {r.system} {r.size} B rep {r.rep}: {r.socket_errors} socket errors, {r.non_2xx} non-2xx"
            + (f" (its own account of abnormal session ends: {r.peer_ends})"
               if isinstance(getattr(r, "peer_ends", None), str) and r.peer_ends else "")
            for r in bad.itertuples()]


def plot(df: pd.DataFrame):
    """req/s vs size, one panel per regime (bars with their values when a panel has one size); one
    style per system (experiments.style); the paper's 1 KB values as stars, inside the axis range
    the data set (never stretching it)."""
    from experiments.style import few_reps_warning, styles
    regimes = [r for r in (CONVERTER_BOUND, END_HOST_BOUND) if r in set(df["regime"])]
    fig, axes = plt.subplots(1, len(regimes), figsize=(6.4 * len(regimes), 4.6), squeeze=False, sharey=True)
    style = styles(df["system"])
    for ax, regime in zip(axes[0], regimes):
        sub = df[df["regime"] == regime]
        sizes = sorted(set(sub["size"]))
        stats = {name: g.groupby("size")["req_per_s"].apply(lambda v: mean_ci(v)).apply(pd.Series)
                 for name, g in sub.groupby("system", sort=False)}
        if len(sizes) == 1:
            for i, (name, st) in enumerate(stats.items()):
                bar = ax.bar(i, st[0].iloc[0], yerr=st[1].iloc[0], capsize=3, color=style[name]["color"], label=name)
                ax.bar_label(bar, fmt="%.0f", fontsize=7, padding=2)
            ax.set_xticks(range(len(stats)), list(stats), rotation=30, ha="right", fontsize=7)
            ax.set_xlabel(f"file size {sizes[0] / KB:g} KB")
        else:
            for name, st in stats.items():
                ax.errorbar(st.index / KB, st[0], yerr=st[1], capsize=3, label=name, **style[name])
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("file size [KB]")
            lo, hi = ax.get_ylim()
            for name in stats:
                paper_name = "haproxy-8t" if name.startswith("haproxy-") and name[8:9] != "1" and "-tcp" not in name \
                    else name
                if paper_name in PAPER_1KB and lo <= PAPER_1KB[paper_name] <= hi:
                    ax.plot([1], [PAPER_1KB[paper_name]], marker="*", ms=12, ls="none", color=style[name]["color"],
                            alpha=.6)
            ax.set_ylim(lo, hi)
            ax.plot([], [], marker="*", ls="none", color="gray", label="paper, 1 KB (8-core testbed)")
        ax.set_title(f"{regime}" + (" (each converter: same CPU quota per loop)" if regime == CONVERTER_BOUND
                                    else " (no quota: the end hosts' core caps all)"), fontsize=9)
        ax.grid(alpha=.3, which="both")
    from experiments.style import legend_outside
    legend_outside(fig, axes[0])
    axes[0][0].set_ylabel("requests/s (new connection per request)")
    fig.suptitle("Fig. 5: 40 concurrent HTTP clients", fontsize=10)
    few_reps_warning(fig, int(df.groupby(["regime", "system", "size"]).size().min()))
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
