"""The io_uring engine against the epoll core, interleaved in one run (issue 23 item 3).

Two workloads, each converter pinned to its core and held to the converter-bound quota:

- `1KB`: Fig. 5's converter-bound point (1 KB, 40 clients, a new connection per request): MiMBox as
  in Fig. 5 (engine auto: recv()/send() for a direction's first 256 KB, then splice) and with
  `--engine uring`, HAProxy-1t as the usual reference; req/s and converter CPU µs per request;
- `bulk`: Fig. 4's TSO/GSO point (one iperf3 upload through the converter): engine auto (splice for
  bulk), copy (recv()/send() throughout) and uring, HAProxy-1t in tcp mode; Gbit/s and converter CPU
  ms per GB.

Ratios are per repetition (the same rep's load and steal): uring / auto, uring / HAProxy.

    python -m experiments.uring [--quick]
"""
from __future__ import annotations

import sys

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import (  # noqa: E402
    CONVERTER_CPUS,
    CONVERTER_QUOTA_CORES,
    END_HOST_CPUS,
    interleave,
    mean_ci,
    progress,
    run_experiment,
    running,
)
from experiments.measure.tools import iperf3  # noqa: E402
from experiments.style import styles  # noqa: E402
from experiments.systems import HAProxy, MiMBox  # noqa: E402
from experiments.workload import HTTP_PORT, _measure  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

matplotlib.use("Agg")

NAME = "uring_engine"
FULL = dict(size=1024, reps=7, seconds=5, connections=40, quota_cores=CONVERTER_QUOTA_CORES, bulk_reps=5,
            bulk_seconds=6)
QUICK = dict(size=1024, reps=3, seconds=3, connections=40, quota_cores=CONVERTER_QUOTA_CORES, bulk_reps=2,
             bulk_seconds=3)
IPERF_PORT = 5201
SMALL, BULK = "1KB", "bulk"
URING, EPOLL = "mimbox-uring", "mimbox"


def small_systems() -> list:
    """HAProxy-1t, MiMBox as in Fig. 5 (epoll, engine auto) and on the io_uring engine."""
    c = CONVERTER_CPUS
    return [HAProxy(threads=1, cpus=c), MiMBox(mode="explicit", cpus=c), MiMBox(mode="explicit", engine="uring", cpus=c)]


def bulk_systems() -> list:
    """HAProxy-1t tcp, MiMBox on each engine."""
    c = CONVERTER_CPUS
    return [HAProxy(threads=1, mode="tcp", cpus=c), MiMBox(mode="explicit", cpus=c),
            MiMBox(mode="explicit", engine="copy", cpus=c), MiMBox(mode="explicit", engine="uring", cpus=c)]


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    from experiments.goodput import set_offloads
    rows, boxes = [], {}
    with Testbed(PaperTopo()) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        try:
            syss = small_systems()
            with running(tb, syss, CONVERTER_BOUND, params["quota_cores"], HTTP_PORT) as boxes[SMALL]:
                for r in _measure(tb, syss, CONVERTER_BOUND, [params["size"]], params):
                    rows.append(dict(workload=SMALL, system=r["system"], rep=r["rep"], rate=r["req_per_s"],
                                     cost=r["cpu_us_per_req"], socket_errors=r["socket_errors"]))
        finally:
            web.stop()
        if params.get("bulk_reps"):
            sink = servers.iperf3(tb, IPERF_PORT, mptcp=False, cpus=END_HOST_CPUS)
            set_offloads(tb, True)
            try:
                syss = bulk_systems()
                with running(tb, syss, CONVERTER_BOUND, params["quota_cores"], IPERF_PORT) as boxes[BULK]:
                    for rep in range(params["bulk_reps"]):
                        for s in interleave(syss, rep):
                            rows.append(_bulk_one(tb, s, rep, params))
            finally:
                sink.stop()
    return pd.DataFrame(rows), {"regime": boxes}


def _bulk_one(tb, s, rep: int, params: dict) -> dict:
    c0 = s.cpu_s()
    r = iperf3(tb, s, IPERF_PORT, params["bulk_seconds"], cpus=END_HOST_CPUS)
    gb = max(r["bytes"] / 1e9, 1e-9)
    row = dict(workload=BULK, system=s.name, rep=rep, rate=r["goodput_bps"] / 1e9, cost=1e3 * (s.cpu_s() - c0) / gb,
               socket_errors=0)
    progress(f"uring bulk rep {rep} {s.name}: {row['rate']:.2f} Gbit/s, {row['cost']:.0f} ms CPU/GB")
    return row


UNITS = {SMALL: ("req/s", "µs CPU/request"), BULK: ("Gbit/s", "ms CPU/GB")}


def tables(df: pd.DataFrame) -> dict:
    """summary: per workload and system, the mean rate and cost with 95 % intervals; ratios: per rep,
    uring over each other system (rate and cost)."""
    out, ratios = [], []
    for w, d in df.groupby("workload", sort=False):
        for s, g in d.groupby("system", sort=False):
            (rate, rci), (cost, cci) = mean_ci(g.rate), mean_ci(g.cost)
            out.append(dict(workload=w, system=s, reps=len(g), rate=round(rate, 3), rate_ci95=round(rci, 3),
                            rate_unit=UNITS[w][0], cost=round(cost, 2), cost_ci95=round(cci, 2),
                            cost_unit=UNITS[w][1]))
        rate = d.pivot_table(index="rep", columns="system", values="rate")
        cost = d.pivot_table(index="rep", columns="system", values="cost")
        if URING not in rate:
            continue
        for other in rate.columns:
            if other == URING:
                continue
            rr, cr = rate[URING] / rate[other], cost[URING] / cost[other]
            (rm, rc), (cm, cc) = mean_ci(rr.dropna()), mean_ci(cr.dropna())
            ratios.append(dict(workload=w, pair=f"{URING} / {other}", reps=int(rr.notna().sum()),
                               rate_ratio=round(rm, 3), rate_ratio_ci95=round(rc, 3),
                               rate_ratio_median=round(float(rr.median()), 3), cost_ratio=round(cm, 3),
                               cost_ratio_ci95=round(cc, 3)))
    return {"summary": pd.DataFrame(out), "ratios": pd.DataFrame(ratios)}


def findings(df: pd.DataFrame) -> dict:
    """uring over the epoll core (engine auto), per workload: rate and cost ratios (per-rep means)."""
    r = tables(df)["ratios"]
    return {f"{row.workload} {row.pair}": f"rate {row.rate_ratio:.3f} ± {row.rate_ratio_ci95:.3f}, "
                                          f"cost {row.cost_ratio:.3f} ± {row.cost_ratio_ci95:.3f}"
            for row in r.itertuples()} if len(r) else {}


def plot(df: pd.DataFrame):
    """Rate and cost per system, one row of panels per workload."""
    ws = list(dict.fromkeys(df.workload))
    fig, axes = plt.subplots(len(ws), 2, figsize=(8, 3.0 * len(ws)), squeeze=False)
    for row, w in zip(axes, ws):
        d = df[df.workload == w]
        names = list(dict.fromkeys(d.system))
        style = styles(names)
        for ax, col, unit in zip(row, ("rate", "cost"), UNITS[w]):
            m = [mean_ci(d[d.system == n][col]) for n in names]
            ax.bar(range(len(names)), [a for a, _ in m], yerr=[b for _, b in m], capsize=3,
                   color=[style[n]["color"] for n in names])
            for i, (a, _) in enumerate(m):
                ax.text(i, a, f"{a:.3g}", ha="center", va="bottom", fontsize=8)
            ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
            ax.set_ylabel(f"{unit} ({w})")
    fig.suptitle("io_uring engine vs the epoll core (converter-bound, same CPU quota)", fontsize=9)
    fig.tight_layout()
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this measurement (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv) is None)
