"""Fig. 5 — requests/s vs file size: 40 concurrent HTTP clients, a new connection per request.

wrk (weighttp is not packaged) sends `Connection: close` GETs through each system to nginx on the
server (nginx instead of the paper's Apache, so the server is not the bottleneck). Systems: the
router (end-to-end MPTCP), MiMBox (explicit) with 1 worker and with N workers, HAProxy with 1 and
N threads (N = cores here; the paper's 8 on an 8-core box), Squid. The converter's CPU time per request is recorded too.
"""
from __future__ import annotations

import os
import sys

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import (  # noqa: E402
    CONVERTER_CPUS,
    END_HOST_CPUS,
    fidelity_rows,
    interleave,
    mean_ci,
    progress,
    run_experiment,
)
from experiments.measure import cpu_seconds  # noqa: E402
from experiments.measure.tools import wrk  # noqa: E402
from experiments.systems import HAProxy, MiMBox, Router, Squid  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "fig5_workload"
KB = 1024
FULL = dict(sizes=[1 * KB, 4 * KB, 16 * KB, 64 * KB, 256 * KB, 1024 * KB], reps=5, seconds=10, connections=40)
QUICK = dict(sizes=[1 * KB, 4 * KB, 16 * KB, 64 * KB, 256 * KB, 1024 * KB], reps=3, seconds=3, connections=40)
# The paper's Fig. 5 at 1 KB (requests/s, §4.3 text)
PAPER_1KB = {"mimbox": 22_000, "haproxy-8t": 18_000, "haproxy-1t": 9_500, "squid": 2_500}
HTTP_PORT = 80


def systems() -> list:
    n = os.cpu_count() or 2
    c = CONVERTER_CPUS if n == 2 else None
    all_cpus = ",".join(str(i) for i in range(n))
    # one event loop each on the converter's core; then n of them on every core (same count each)
    return [Router(), MiMBox(mode="explicit", cpus=c), HAProxy(threads=1, cpus=c), Squid(cpus=c),
            MiMBox(mode="explicit", port=7006, cpus=all_cpus, workers=n, extra=["--queue-num", "4250"]),
            HAProxy(threads=n, port=7005, cpus=all_cpus)]


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows = []
    with Testbed(PaperTopo()) as tb:
        fidelity = fidelity_rows(tb, seconds=1.0)
        syss = systems()
        web = servers.nginx(tb, params["sizes"], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        web_mptcp = servers.nginx(tb, params["sizes"], HTTP_PORT + 1, mptcp=True, cpus=END_HOST_CPUS)
        try:
            for s in syss:
                s.start(tb, HTTP_PORT)
            for rep in range(params["reps"]):
                for size in params["sizes"]:
                    for s in interleave(syss, rep):
                        port = HTTP_PORT + 1 if isinstance(s, Router) else HTTP_PORT
                        pids = s.pids()
                        c0 = cpu_seconds(pids)
                        r = wrk(tb, s, port, f"/{size}.bin", params["seconds"], params["connections"],
                                cpus=END_HOST_CPUS)
                        cpu = cpu_seconds(pids) - c0
                        rows.append(dict(system=s.name, size=size, rep=rep, **r,
                                         converter_cpu_s=cpu if s.converts else float("nan"),
                                         cpu_us_per_req=1e6 * cpu / r["requests"] if s.converts and r["requests"]
                                         else float("nan")))
                        progress(f"fig5 rep {rep} {size} B {s.name}: {r['req_per_s']:.0f} req/s "
                                 f"({r['socket_errors']} socket errors)")
        finally:
            for s in syss:
                s.stop()
            web.stop()
            web_mptcp.stop()
    return pd.DataFrame(rows), {"link_fidelity": fidelity}


def plot(df: pd.DataFrame):
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, g in df.groupby("system", sort=False):
        st = g.groupby("size")["req_per_s"].apply(lambda v: mean_ci(v)).apply(pd.Series)
        line = ax.errorbar(st.index / KB, st[0], yerr=st[1], marker="o", capsize=3, label=name)
        paper_name = "haproxy-8t" if name.startswith("haproxy-") and name != "haproxy-1t" else name
        if paper_name in PAPER_1KB:
            ax.plot([1], [PAPER_1KB[paper_name]], marker="*", ms=12, ls="none", color=line[0].get_color(),
                    alpha=.6)
    ax.plot([], [], marker="*", ls="none", color="gray", label="paper, 1 KB (8-core testbed)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("file size [KB]")
    ax.set_ylabel("requests/s (new connection per request)")
    ax.set_title("Fig. 5: 40 concurrent HTTP clients", fontsize=9)
    ax.grid(alpha=.3, which="both")
    ax.legend(fontsize=8)
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
