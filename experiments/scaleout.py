"""Scale-out — N converters behind one ECMP service address (topologies/cluster.py).

Fig. 5's converter-bound point (1 KB files, 40 clients, a new connection per request, MPTCP from
the phone) through N = 1, 2, 3 MiMBox instances (explicit mode), each held to the same CPU quota as
one converter in Fig. 5 (experiments.common.CONVERTER_QUOTA_CORES): req/s against the ideal
N x (N=1) line, with the MPTCP joins that met a converter without their token (MPJoinNoTokenFound,
must stay 0 with the C flag and the announced address) and how the connections spread. The front
router's group is narrowed to the first N converters for each point; the unconverted path (the
phone speaking MPTCP to the server through the front router) is the end hosts' ceiling.
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
    mean_ci,
    converter_boxes,
    progress,
    run_experiment,
)
from experiments.measure.tools import wrk  # noqa: E402
from experiments.style import styles  # noqa: E402
from experiments.systems import MiMBox, Router  # noqa: E402
from topologies.support import ALLOCATE, wait_until  # noqa: E402
from topologies.cluster import ClusterTestbed, ClusterTopo  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402

NAME = "scaleout"
FULL = dict(instances=[1, 2, 3], size=1024, reps=5, seconds=5, connections=40, quota_cores=CONVERTER_QUOTA_CORES)
QUICK = dict(instances=[1, 2, 3], size=1024, reps=5, seconds=5, connections=40, quota_cores=CONVERTER_QUOTA_CORES)
HTTP_PORT = 80


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    n_max = max(params["instances"])
    rows = []
    with ClusterTestbed(ClusterTopo(n=n_max)) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        web_mptcp = servers.nginx(tb, [params["size"]], HTTP_PORT + 1, mptcp=True, cpus=END_HOST_CPUS)
        port = ALLOCATE.port()
        boxes = [MiMBox(mode="explicit", port=port, cpus=CONVERTER_CPUS, workers=1,
                        extra=["--allow-client", "10.0.0.0/16"]) for _ in range(n_max)]
        router = Router()
        try:
            with converter_boxes(boxes, CONVERTER_BOUND, params["quota_cores"]) as regime:
                try:
                    for k, box in enumerate(boxes):
                        box.start(tb.instance(k), HTTP_PORT)
                    for rep in range(params["reps"]):
                        order = params["instances"] if rep % 2 == 0 else params["instances"][::-1]
                        for n in [*order, "router"]:
                            rows.append(_point(tb, boxes, router, n, rep, params))
                finally:
                    for box in boxes:
                        box.stop()
        finally:
            tb.route_vip()
            web.stop()
            web_mptcp.stop()
    return pd.DataFrame(rows), {"regime": regime, "mode": "explicit", "converter_cpus": CONVERTER_CPUS,
                                "front": {"hash_policy": 1, "resilient": tb.resilient}}


def _point(tb: ClusterTestbed, boxes: list[MiMBox], router: Router, n, rep: int, params: dict) -> dict:
    path = f"/{params['size']}.bin"
    if n == "router":
        r = wrk(tb.instance(0), router, HTTP_PORT + 1, path, params["seconds"], params["connections"],
                cpus=END_HOST_CPUS)
        progress(f"scaleout rep {rep} router: {r['req_per_s']:.0f} req/s")
        return dict(instances=0, system="router", rep=rep, **r)
    # the previous point's connections end before the group changes: with idle_timer 0 a change moves
    # the hash buckets of flows still open, whose next packets then meet a converter without them (it
    # resets them, and a reused client port may meet a stale segment); resilient hashing moves none
    # of them only while the group holds still
    wait_until(lambda: not any(st["active"] or st["pending"] for st in (b.stats() for b in boxes)), 30,
               "the previous point's connections and held SYNs gone", every=0.1)
    tb.route_vip(members=n)
    lost0 = [tb.mib(c, "MPJoinNoTokenFound") for c in tb.converters]
    rejected0 = sum(tb.mib(c, "MPJoinRejected") for c in tb.converters)
    joins0 = sum(tb.mib(c, "MPJoinAckRx") for c in tb.converters)
    st0 = [b.stats() for b in boxes]
    acc0 = [s["accepted"] for s in st0]
    cpu0 = [b.cpu_s() for b in boxes]
    r = wrk(tb.instance(0), boxes[0], HTTP_PORT, path, params["seconds"], params["connections"], cpus=END_HOST_CPUS)
    cpu = sum(b.cpu_s() - c for b, c in zip(boxes, cpu0))
    st1 = [b.stats() for b in boxes]
    acc = [s["accepted"] - a for s, a in zip(st1, acc0)]
    row = dict(instances=n, system=f"mimbox x{n}", rep=rep, **r,
               converter_cpu_s=cpu, cpu_us_per_req=1e6 * cpu / r["requests"] if r["requests"] else float("nan"),
               joins=sum(tb.mib(c, "MPJoinAckRx") for c in tb.converters) - joins0,
               joins_no_token=sum(tb.mib(c, "MPJoinNoTokenFound") for c in tb.converters) - sum(lost0),
               joins_rejected=sum(tb.mib(c, "MPJoinRejected") for c in tb.converters) - rejected0,
               accepted_per_instance="/".join(map(str, acc)),
               busiest_share=max(acc) / max(1, sum(acc)),
               # what the converters refused or ended in an error meanwhile (a wrk socket error's cause)
               converter_refused=_deltas(st0, st1, "refused"), converter_errors=_deltas(st0, st1, "errors"))
    progress(f"scaleout rep {rep} N={n}: {r['req_per_s']:.0f} req/s, {row['cpu_us_per_req']:.0f} µs/req, "
             f"spread {row['accepted_per_instance']}, joins {row['joins']} (no token {row['joins_no_token']})")
    return row


def _deltas(before: list[dict], after: list[dict], key: str) -> str:
    """What grew in each converter's `key` counters, as JSON ({"converter k": {cause: n}})."""
    import json
    out = {}
    for k, (a, b) in enumerate(zip(before, after)):
        grew = {c: n - a[key].get(c, 0) for c, n in b[key].items() if n > a[key].get(c, 0)}
        if grew:
            out[f"converter {k}"] = grew
    return json.dumps(out)


def findings(df: pd.DataFrame) -> dict:
    """Scaling efficiency: req/s at N over N x req/s at N=1 (means over reps)."""
    conv = df[df["instances"] > 0]
    means = conv.groupby("instances")["req_per_s"].mean()
    one = means.get(1)
    router = df[df["system"] == "router"]["req_per_s"].mean()
    return {"req_per_s": {int(n): round(v, 1) for n, v in means.items()},
            "efficiency": {int(n): round(v / (n * one), 3) for n, v in means.items()} if one else {},
            "router_req_per_s": round(router, 1),
            "joins_no_token_total": int(conv["joins_no_token"].sum()),
            "joins_total": int(conv["joins"].sum())}


def problems(df: pd.DataFrame) -> list[str]:
    bad = df[(df["socket_errors"] > 0) | (df["non_2xx"] > 0)]
    out = [f"{r.system} rep {r.rep}: {r.socket_errors} socket errors, {r.non_2xx} non-2xx"
           + (f" (converters refused {r.converter_refused}, errors {r.converter_errors})"
              if isinstance(getattr(r, "converter_refused", None), str) else "") for r in bad.itertuples()]
    lost = df[df["joins_no_token"] > 0]      # NaN (the router's rows) is not > 0
    out += [f"{r.system} rep {r.rep}: {r.joins_no_token} joins met a converter without their token"
            for r in lost.itertuples()]
    return out


def plot(df: pd.DataFrame):
    """req/s vs N with the ideal N x (N=1) line and the unconverted path's ceiling."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    conv = df[df["instances"] > 0]
    st = conv.groupby("instances")["req_per_s"].apply(lambda v: mean_ci(v)).apply(pd.Series)
    ax.errorbar(st.index, st[0], yerr=st[1], capsize=3, label="MiMBox x N (explicit, each 25 % of a core)",
                **styles(["mimbox"])["mimbox"])
    if 1 in st.index:
        ax.plot(st.index, st.index * st.loc[1, 0], ls="--", color="gray", label="ideal: N x (N = 1)")
    router = df[df["system"] == "router"]["req_per_s"]
    if len(router):
        ax.axhline(router.mean(), color=styles(["router"])["router"]["color"], ls=":",
                   label="no converter (MPTCP end to end): end hosts' ceiling")
    for n, g in conv.groupby("instances"):
        lost = int(g["joins_no_token"].sum())
        ax.annotate(f"joins w/o token: {lost}", (n, g["req_per_s"].mean()), textcoords="offset points",
                    xytext=(5, -14), fontsize=7)
    ax.set_xticks(sorted(st.index))
    ax.set_xlabel("converters behind the ECMP address (N)")
    ax.set_ylabel("requests/s (1 KB, new connection per request)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=.3)
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Scale-out: converter-bound, same CPU quota per instance", fontsize=9)
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
