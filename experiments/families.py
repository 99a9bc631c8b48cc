"""Fig. 5's converter-bound 1 KB point in both IP families, in one run: MiMBox (explicit, DST_OPT),
HAProxy 1 thread and the router, each once over IPv4 and once over IPv6 (client, converter and
server all of the family), interleaved, every converter held to the same CPU quota.

    python -m experiments.families [--quick]

Every system runs with the client's TCP timestamps off, in both families: DST_OPT's 22-byte IPv6
form fits a SYN only without them (results/dstopt_room), and the IPv4 rows must be measured the
same way to be compared. The router's server is nginx made MPTCP (the paper's baseline), the
converters' a plain TCP nginx, as in Fig. 5.
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
    conversion,
    converter_boxes,
    interleave,
    mean_ci,
    mptcp_mib,
    progress,
    run_experiment,
)
from experiments.measure.tools import wrk  # noqa: E402
from experiments.systems import HAProxy, MiMBox, Router  # noqa: E402
from experiments.workload import HTTP_PORT, settle  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402


NAME = "fig5_families"
FULL = dict(size=1024, reps=7, seconds=5, connections=40, quota_cores=CONVERTER_QUOTA_CORES)
QUICK = dict(size=1024, reps=3, seconds=3, connections=40, quota_cores=CONVERTER_QUOTA_CORES)
FAMILIES = (4, 6)


def systems() -> list[tuple[int, object]]:
    """(family, system) pairs: router, MiMBox explicit and HAProxy-1t in each family; the
    converters' systems get the family in their name (their CPU boxes are named after it)."""
    out = []
    for family in FAMILIES:
        for s in (Router(), MiMBox(mode="explicit", cpus=CONVERTER_CPUS), HAProxy(threads=1, cpus=CONVERTER_CPUS)):
            s.family_name = s.name
            s.name = f"{s.name}-ipv{family}"
            out.append((family, s))
    return out


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows = []
    with Testbed(PaperTopo()) as tb:
        old_ts = tb.client.cmd("sysctl -n net.ipv4.tcp_timestamps").strip()
        tb.client.cmd("sysctl -qw net.ipv4.tcp_timestamps=0")
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS, ipv6=True)
        web_mptcp = servers.nginx(tb, [params["size"]], HTTP_PORT + 1, mptcp=True, cpus=END_HOST_CPUS, ipv6=True)
        pairs = systems()
        views = {id(s): tb.view(f, f) for f, s in pairs}
        syss = [s for _, s in pairs]
        try:
            with converter_boxes(syss, CONVERTER_BOUND, params["quota_cores"]) as box:
                try:
                    for s in syss:
                        s.start(views[id(s)], HTTP_PORT)
                    rows = _measure(tb, views, syss, params)
                finally:
                    for s in syss:
                        s.stop()
        finally:
            web.stop()
            web_mptcp.stop()
            tb.client.cmd(f"sysctl -qw net.ipv4.tcp_timestamps={old_ts}")
    return pd.DataFrame(rows), {"regime": box, "client_tcp_timestamps": 0}


def _measure(tb, views: dict, syss: list, params: dict) -> list[dict]:
    rows = []
    for rep in range(params["reps"]):
        for s in interleave(syss, rep):
            view = views[id(s)]
            port = HTTP_PORT + 1 if isinstance(s, Router) else HTTP_PORT
            settle(tb)
            c0, mib0 = s.cpu_s(), mptcp_mib(tb.mbox)
            r = wrk(view, s, port, f"/{params['size']}.bin", params["seconds"], params["connections"],
                    cpus=END_HOST_CPUS)
            cpu, mib = s.cpu_s() - c0, conversion(mib0, mptcp_mib(tb.mbox))
            rows.append(dict(system=s.family_name, family=f"IPv{view.client_family}", size=params["size"], rep=rep,
                             **r, **mib, converter_cpu_s=cpu if s.converts else float("nan"),
                             cpu_us_per_req=1e6 * cpu / r["requests"] if s.converts and r["requests"] else float("nan")))
            progress(f"families rep {rep} {s.name}: {r['req_per_s']:.0f} req/s, {rows[-1]['cpu_us_per_req']:.0f} µs/req")
    return rows


def tables(df: pd.DataFrame) -> dict:
    """Means per system and family; each converter over HAProxy-1t of its family, per rep; each
    system's IPv6 over its IPv4, per rep."""
    g = df.groupby(["system", "family"], sort=False).agg(
        req_per_s=("req_per_s", "mean"), cpu_us_per_req=("cpu_us_per_req", "mean"),
        socket_errors=("socket_errors", "sum"), reps=("rep", "count")).reset_index()
    rps = df.pivot_table(index=["family", "rep"], columns="system", values="req_per_s")
    g["vs_haproxy_1t_median"] = [
        round(float((rps[r.system] / rps["haproxy-1t"]).loc[r.family].median()), 3) for r in g.itertuples()]
    by_family = df.pivot_table(index="rep", columns=["system", "family"], values="req_per_s")
    g["ipv6_over_ipv4_median"] = [
        round(float((by_family[(r.system, "IPv6")] / by_family[(r.system, "IPv4")]).median()), 3) for r in g.itertuples()]
    return {"summary": g}


def findings(df: pd.DataFrame) -> dict:
    """Converter-bound check per family: the router >= 2x the best converter."""
    out = {}
    for fam, sub in df.groupby("family"):
        means = sub.groupby("system")["req_per_s"].mean()
        best = means.drop("router").max()
        out[fam] = {"router_over_best_converter": round(float(means["router"] / best), 2),
                    "converter_bound": bool(means["router"] >= 2 * best)}
    return {"bound_check": out}


def problems(df: pd.DataFrame) -> list[str]:
    bad = df[(df["socket_errors"] > 0) | (df["non_2xx"] > 0)]
    return [f"{r.system} {r.family} rep {r.rep}: {r.socket_errors} socket errors, {r.non_2xx} non-2xx"
            for r in bad.itertuples()]


def plot(df: pd.DataFrame):
    """req/s per system, IPv4 and IPv6 side by side, with 95 % intervals over the reps."""
    from experiments.style import few_reps_warning
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    names = list(dict.fromkeys(df["system"]))
    width = 0.38
    for j, (fam, color) in enumerate((("IPv4", "#4c72b0"), ("IPv6", "#dd8452"))):
        stats = [mean_ci(df[(df.system == n) & (df.family == fam)]["req_per_s"]) for n in names]
        bars = ax.bar([i + (j - 0.5) * width for i in range(len(names))], [m for m, _ in stats], width,
                      yerr=[e for _, e in stats], capsize=3, color=color, label=fam)
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("requests/s (new connection per request)")
    ax.set_title("Fig. 5, 1 KB, converter-bound, in both families (client timestamps off)", fontsize=9)
    ax.grid(alpha=.3, axis="y")
    ax.legend(fontsize=8)
    few_reps_warning(fig, int(df.groupby(["system", "family"]).size().min()))
    fig.tight_layout()
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
