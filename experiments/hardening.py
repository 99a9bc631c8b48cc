"""What making the converter safe to expose costs, at Fig. 5's converter-bound point (1 KB, 40
clients, a new connection per request, every converter held to the same CPU quota), interleaved in
one run with HAProxy-1t as the usual reference:

- RFC 8803 mode as built now (SYN data only with a valid TFO cookie, a client waiting for its
  message counted and capped) and as built before (the listener took SYN data from anyone:
  TCP_FASTOPEN_NO_COOKIE). wrk's clients run through this tree's `mimbox client --convert`: it
  asks for the cookie on its first connection, then puts every Convert message in the SYN.
- explicit mode with least privilege (the default: the mimbox user, CAP_NET_ADMIN only, seccomp
  on every system call) and with `--user root` (no filter), and as built before.

    python -m experiments.hardening [--before COMMIT] [--quick]

The earlier build is exported from git (COMMIT, default the last one before the change) into a
temporary directory and built there; it runs from there (PYTHONPATH).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import CONVERTER_CPUS, CONVERTER_QUOTA_CORES, END_HOST_CPUS, mean_ci, run_experiment, running  # noqa: E402
from experiments.systems import PY, HAProxy, MiMBox, Router, ready_line  # noqa: E402
from experiments.workload import HTTP_PORT, _measure  # noqa: E402
from topologies.regimes import CONVERTER_BOUND  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "hardening"
BEFORE = "999dc85"      # the last commit before convert mode required TFO cookies
FULL = dict(size=1024, reps=5, seconds=5, connections=40, quota_cores=CONVERTER_QUOTA_CORES, before=BEFORE)
QUICK = dict(size=1024, reps=3, seconds=3, connections=40, quota_cores=CONVERTER_QUOTA_CORES, before=BEFORE)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_before(commit: str) -> str:
    """`commit`'s tree, exported and built in a temporary directory (removed at exit)."""
    d = tempfile.mkdtemp(prefix="mimbox-before-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", d], input=archive, check=True)
    subprocess.run([PY, "-m", "invoke", "build"], cwd=d, check=True, capture_output=True)
    return d


# `mimbox run` from another tree: this venv's editable install maps `mimbox` to this checkout with a
# meta-path finder that PYTHONPATH does not override, so the launcher drops it first
LAUNCH = ("import os, runpy, sys; tree = sys.argv.pop(1); "
          "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
          "sys.path.insert(0, tree); sys.modules.pop('mimbox', None); import mimbox; "
          "assert mimbox.__file__.startswith(tree), mimbox.__file__; "
          "sys.argv[0] = 'mimbox'; runpy.run_module('mimbox.ops.cli' if os.path.exists(tree + '/mimbox/ops/cli.py') "
          "else 'mimbox.cli', run_name='__main__')")        # (the command line moved to mimbox/ops/ in round 4)


class MiMBoxBefore(MiMBox):
    """MiMBox as built from an earlier tree (its own command line: that build knows none of today's
    policy or privilege flags)."""

    def __init__(self, tree: str, commit: str, **kw):
        super().__init__(**kw)
        self.tree = tree
        self.name = f"mimbox-{self.mode}@{commit}"

    def start(self, tb, server_port: int) -> None:
        self.host = tb.mbox
        argv = [PY, "-c", LAUNCH, self.tree, "run", "--listen", f"0.0.0.0:{self.port}",
                "--mode", self.mode, "--stats", self.stats_path, *self.extra]
        self.proc = self._popen(tb.mbox, argv)
        line = ready_line(self.proc)
        if "ready" not in line:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {line} {self.log()[-2000:]}")


def systems(tree: str, commit: str) -> list:
    c = CONVERTER_CPUS
    root = MiMBox(mode="explicit", cpus=c, extra=["--user", "root"])
    root.name = "mimbox-root"
    return [Router(), HAProxy(threads=1, cpus=c), MiMBox(mode="convert", cpus=c),
            MiMBoxBefore(tree, commit, mode="convert", cpus=c), MiMBox(mode="explicit", cpus=c), root,
            MiMBoxBefore(tree, commit, mode="explicit", cpus=c)]


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    tree = build_before(params["before"])
    with Testbed(PaperTopo()) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        web_mptcp = servers.nginx(tb, [params["size"]], HTTP_PORT + 1, mptcp=True, cpus=END_HOST_CPUS)
        syss = systems(tree, params["before"])
        try:
            with running(tb, syss, CONVERTER_BOUND, params["quota_cores"], HTTP_PORT) as box:
                rows = _measure(tb, syss, CONVERTER_BOUND, [params["size"]], params)
                tfo = tb.mbox.cmd("nstat -az TcpExtTCPFastOpenPassive TcpExtTCPFastOpenCookieReqd")
        finally:
            web.stop()
            web_mptcp.stop()
    return pd.DataFrame(rows), {"regime": box, "tfo_counters_converter_host": tfo.strip().splitlines()[1:]}


PAIRS = (("mimbox-convert", "mimbox-convert@"), ("mimbox", "mimbox-explicit@"), ("mimbox", "mimbox-root"))


def tables(df: pd.DataFrame) -> dict:
    """Means per system, and per rep the ratios of each pair (now / before, least privilege / root)."""
    g = df.groupby("system", sort=False).agg(req_per_s=("req_per_s", "mean"), cpu_us_per_req=("cpu_us_per_req", "mean"),
                                             socket_errors=("socket_errors", "sum"))
    g["req_per_s_vs_haproxy_1t"] = (g.req_per_s / g.loc["haproxy-1t"].req_per_s).round(3)
    per_rep = df.pivot_table(index="rep", columns="system", values="req_per_s")
    cpu_rep = df.pivot_table(index="rep", columns="system", values="cpu_us_per_req")
    rows = []
    for a, b in PAIRS:
        b = next(s for s in per_rep.columns if s.startswith(b))
        for rep in per_rep.index:
            rows.append(dict(pair=f"{a} / {b}", rep=rep, req_per_s=round(per_rep.loc[rep, a] / per_rep.loc[rep, b], 3),
                             cpu_us_per_req=round(cpu_rep.loc[rep, a] / cpu_rep.loc[rep, b], 3)))
    return {"summary": g.reset_index(), "ratios": pd.DataFrame(rows)}


def problems(df: pd.DataFrame) -> list[str]:
    bad = df[(df["socket_errors"] > 0) | (df["non_2xx"] > 0)]
    return [f"{r.system} rep {r.rep}: {r.socket_errors} socket errors, {r.non_2xx} non-2xx" for r in bad.itertuples()]


def bars(df: pd.DataFrame, title: str, figsize=(6.4, 3.8)):
    """Mean req/s per system with 95 % intervals, values printed (hardening, abtest)."""
    fig, ax = plt.subplots(figsize=figsize)
    names = list(dict.fromkeys(df.system))
    means = [mean_ci(df[df.system == n].req_per_s) for n in names]
    ax.bar(range(len(names)), [m for m, _ in means], yerr=[c for _, c in means], color="0.6", capsize=3)
    for i, (m, _) in enumerate(means):
        ax.text(i, m, f"{m:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), names, rotation=15, fontsize=8)
    ax.set_ylabel("requests/s (1 KB, converter-bound)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot(df: pd.DataFrame):
    return bars(df[df.system != "router"], "Hardening: now vs before, least privilege vs root")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", default=BEFORE, help="the commit to compare with")
    a = ap.parse_args(argv)
    run_experiment(sys.modules[__name__], a.quick, {"before": a.before})
    return 0


if __name__ == "__main__":
    sys.exit(main())
