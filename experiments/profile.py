"""Where a converted request's time goes: py-spy on MiMBox under Fig. 5's 1 KB load.

The issue's risk was per-connection work in Python. The converter (one worker, pinned to its core)
serves wrk's 40 concurrent `Connection: close` clients while py-spy samples it; each sample is
charged to the source line it was on, and a line is a *system call* when it calls into the kernel
(splice, connect, the NFQUEUE verdict, shutdown, close, accept, ...). Time blocked in epoll_wait
is idle and not sampled. The converter's CPU time per request is recorded beside it.
"""
from __future__ import annotations

import linecache
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import matplotlib
import pandas as pd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments import servers  # noqa: E402
from experiments.common import CONVERTER_CPUS, END_HOST_CPUS, progress, run_experiment  # noqa: E402
from experiments.measure import cpu_seconds  # noqa: E402
from experiments.measure.tools import wrk  # noqa: E402
from experiments.systems import MiMBox  # noqa: E402
from topologies.testbed import PaperTopo, Testbed  # noqa: E402

NAME = "profile_converter"
FULL = dict(size=1024, seconds=20, reps=3, rate=250, connections=40)
QUICK = dict(size=1024, seconds=6, reps=2, rate=200, connections=40)
HTTP_PORT = 80
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")
# a source line that calls one of these enters the kernel
SYSCALLS = re.compile(r"\b(splice|connect_ex|_?accept|shutdown|close|setsockopt|getsockopt|pipe2|poll|"
                      r"register|unregister|send_fds|recv_fds|readv|write|read|run|fcntl|_real_close)\b\(")


def py_spy() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    return exe if os.path.exists(exe) else "py-spy"


def classify(func: str, path: str, line: int) -> tuple[str, str]:
    """(source text, 'system call' | 'Python') of one sampled line."""
    text = linecache.getline(path, line).strip()
    if os.path.basename(path) == "socket.py" or SYSCALLS.search(text) or "pkt.accept()" in text:
        return text, "system call"
    return text, "Python"


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    samples: Counter = Counter()
    cpu_per_req, rps = [], []
    with Testbed(PaperTopo()) as tb:
        web = servers.nginx(tb, [params["size"]], HTTP_PORT, mptcp=False, cpus=END_HOST_CPUS)
        m = MiMBox(mode="explicit", cpus=CONVERTER_CPUS)
        m.start(tb, HTTP_PORT)
        try:
            wrk(tb, m, HTTP_PORT, f"/{params['size']}.bin", 1, params["connections"], cpus=END_HOST_CPUS)
            for rep in range(params["reps"]):
                pids = m.pids()
                with tempfile.NamedTemporaryFile(suffix=".txt") as out:
                    spy = subprocess.Popen([py_spy(), "record", "-p", str(pids[0]), "-d", str(params["seconds"]),
                                            "-r", str(params["rate"]), "-f", "raw", "-o", out.name, "--nonblocking"],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    c0 = cpu_seconds(pids)
                    r = wrk(tb, m, HTTP_PORT, f"/{params['size']}.bin", params["seconds"] - 1,
                            params["connections"], cpus=END_HOST_CPUS)
                    cpu = cpu_seconds(pids) - c0
                    spy.wait(timeout=params["seconds"] + 30)
                    for raw in open(out.name):
                        stack, _, n = raw.rstrip().rpartition(" ")
                        leaf = FRAME.match(stack.split(";")[-1])
                        if leaf:
                            samples[(leaf["func"], leaf["file"], int(leaf["line"]))] += int(n)
                cpu_per_req.append(1e6 * cpu / max(1, r["requests"]))
                rps.append(r["req_per_s"])
                progress(f"profile rep {rep}: {r['req_per_s']:.0f} req/s, {cpu_per_req[-1]:.0f} µs CPU/request")
        finally:
            m.stop()
            web.stop()
    total = sum(samples.values()) or 1
    rows = []
    for (func, path, line), n in samples.most_common():
        text, kind = classify(func, path, line)
        rows.append(dict(function=func, file=os.path.relpath(path) if path.startswith("/") else path, line=line,
                         code=text, kind=kind, samples=n, share=n / total))
    return pd.DataFrame(rows), {"req_per_s": rps, "cpu_us_per_request": cpu_per_req, "samples": total}


def findings(df: pd.DataFrame) -> dict:
    by_kind = df.groupby("kind").share.sum()
    return {"system_call_share": round(float(by_kind.get("system call", 0)), 3),
            "python_share": round(float(by_kind.get("Python", 0)), 3)}


def plot(df: pd.DataFrame):
    top = df.head(12).iloc[::-1]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    colors = ["tab:blue" if k == "system call" else "tab:orange" for k in top.kind]
    ax.barh([f"{c[:48]}  ({f}:{ln})" for c, f, ln in zip(top.code, top.function, top.line)], 100 * top.share,
            color=colors)
    ax.barh([], [], color="tab:blue", label="system call (kernel)")
    ax.barh([], [], color="tab:orange", label="Python")
    ax.set_xlabel("share of the converter's busy samples [%]")
    ax.set_title("Where a converted 1 KB request's time goes (py-spy)", fontsize=9)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8)
    ax.grid(alpha=.3, axis="x")
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this measurement (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
