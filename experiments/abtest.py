"""Two builds of the converter at Fig. 5's converter-bound point (1 KB, 40 clients, a new connection
per request, every converter held to the same CPU quota), interleaved in one run with HAProxy-1t as
the usual reference: a change must show that it adds no per-request cost.

    python -m experiments.abtest --before COMMIT [--mode explicit] [--quick] [--label STEP]

With --label the run goes to results/abtest/STEP/ (one directory per measured change, kept beside
the others: the removals of issue 23 each have one), else to results/abtest/.

The earlier build is exported from git into a temporary directory and built there (as
experiments.hardening does); the later one is this checkout. Ratios are per repetition (the same
rep's load, the same moment's steal), later / earlier.
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd

from experiments import servers  # noqa: E402
from experiments.common import CONVERTER_CPUS, CONVERTER_QUOTA_CORES, END_HOST_CPUS, run_experiment, running  # noqa: E402
from experiments.hardening import LAUNCH, bars, build_before, problems  # noqa: E402, F401 (problems: run_experiment's)
from experiments.systems import PY, HAProxy, MiMBox  # noqa: E402
from experiments.workload import HTTP_PORT, _measure  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "abtest"
BEFORE = "c94ca2a"      # the last commit before the core was split into rooms (issue 22)
FULL = dict(size=1024, reps=7, seconds=5, connections=40, quota_cores=CONVERTER_QUOTA_CORES, before=BEFORE,
            mode="explicit")
QUICK = dict(size=1024, reps=3, seconds=3, connections=40, quota_cores=CONVERTER_QUOTA_CORES, before=BEFORE,
             mode="explicit")


def systems(tree: str, commit: str, mode: str) -> list:
    """HAProxy-1t, this checkout's MiMBox and the earlier tree's, with the same flags (the earlier
    build runs through its own `mimbox` command: experiments.hardening.LAUNCH)."""
    c = CONVERTER_CPUS
    before = MiMBox(mode=mode, cpus=c, program=[PY, "-c", LAUNCH, tree])
    before.name = f"{before.name}@{commit}"
    return [HAProxy(threads=1, cpus=c), MiMBox(mode=mode, cpus=c), before]


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    tree = build_before(params["before"])
    with Testbed(PaperTopo()) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        try:
            syss = systems(tree, params["before"], params["mode"])
            with running(tb, syss, CONVERTER_BOUND, params["quota_cores"], HTTP_PORT) as box:
                rows = _measure(tb, syss, CONVERTER_BOUND, [params["size"]], params)
        finally:
            web.stop()
    return pd.DataFrame(rows), {"regime": box}


def tables(df: pd.DataFrame) -> dict:
    """Means per system, and per rep the ratio later / earlier (and each over HAProxy-1t)."""
    g = df.groupby("system", sort=False).agg(req_per_s=("req_per_s", "mean"), cpu_us_per_req=("cpu_us_per_req", "mean"),
                                             socket_errors=("socket_errors", "sum"))
    g["req_per_s_vs_haproxy_1t"] = (g.req_per_s / g.loc["haproxy-1t"].req_per_s).round(3)
    rps = df.pivot_table(index="rep", columns="system", values="req_per_s")
    cpu = df.pivot_table(index="rep", columns="system", values="cpu_us_per_req")
    before = next(s for s in rps.columns if "@" in s)
    now = next(s for s in rps.columns if s.startswith("mimbox") and "@" not in s)
    ratios = pd.DataFrame({"rep": rps.index, "req_per_s": (rps[now] / rps[before]).round(3).values,
                           "cpu_us_per_req": (cpu[now] / cpu[before]).round(3).values})
    ratios.insert(0, "pair", f"{now} / {before}")
    return {"summary": g.reset_index(), "ratios": ratios}


def plot(df: pd.DataFrame):
    return bars(df, "A/B: this build vs an earlier one", figsize=(5.2, 3.4))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", default=BEFORE, help="the commit to compare with")
    ap.add_argument("--mode", default="explicit", choices=("explicit", "static", "transparent", "convert"))
    ap.add_argument("--label", help="keep this run in results/abtest/LABEL/ (a name for the change)")
    ap.add_argument("--reps", type=int, help="repetitions (default 7, quick 3)")
    a = ap.parse_args(argv)
    over = {"before": a.before, "mode": a.mode, **({"reps": a.reps} if a.reps else {})}
    run_experiment(sys.modules[__name__], a.quick, over, name=f"{NAME}/{a.label}" if a.label else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
