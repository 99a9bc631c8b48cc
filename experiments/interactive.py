"""Interactive delay (§4.4): a fixed 100 kbit/s application stream from the server to the phone on
the mobile topology, 1 % loss on the client side (and, separately, on the server side), 200 KB
socket buffers; application-level delay average and maximum, with and without MiMBox.
(The paper: maximum ~150 ms with MiMBox, ~250 ms without; ~2 ms better on average.)

Why the delays are what they are: each run also records how the sender towards the phone (the
server without a converter, the converter with one) and the server recovered its losses —
retransmission timeouts, tail loss probes, fast retransmits, MPTCP reinjections (RECOVERY) — so a
maximum can be matched to the recovery that caused it; and, with client-side loss, VARIANTS take
one thing away at a time (MPTCP, the second subflow) to see what the maximum depends on.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import matplotlib
import pandas as pd

import matplotlib.pyplot as plt  # noqa: E402

from experiments.common import fidelity_rows, interleave, progress, run_experiment, testbed  # noqa: E402
from experiments.systems import MiMBox, Router, python, ready_line  # noqa: E402
from topologies.testbed import MobileTopo, counters  # noqa: E402

NAME = "interactive_delay"
FULL = dict(seconds=60, reps=3, buffer=200 * 1024, loss=1.0)
QUICK = dict(seconds=15, reps=3, buffer=200 * 1024, loss=1.0)   # max delay is one loss event: repeat
PAPER_MAX_MS = {"mimbox": 150, "direct (no converter)": 250}
PORT = 9600
# client-side loss only: (system, MPTCP end to end, the phone's extra subflows; None: the testbed's)
CLIENT_SUBFLOWS = 2       # what the testbed sets (topologies.testbed: max(2, paths))
VARIANTS = {"direct, TCP (no MPTCP)": ("router", False, None),
            "direct, MPTCP, WiFi subflow only": ("router", True, 0),
            "mimbox, WiFi subflow only": ("mimbox", True, 0)}
# how losses were recovered: nstat names, and the column each becomes (per run, per role)
RECOVERY = {"TcpExtTCPTimeouts": "rto", "TcpExtTCPLossProbes": "tlp", "TcpExtTCPFastRetrans": "fast_retrans",
            "TcpRetransSegs": "retrans_segs", "TcpExtTCPSpuriousRTOs": "spurious_rto",
            "MPTcpExtMPTCPRetrans": "mptcp_reinjected", "MPTcpExtDuplicateData": "mptcp_duplicate_rx"}


def recovery(tb, system, before: dict, after: dict) -> dict:
    """The RECOVERY counters' deltas of this run: `phone_sender_*` is the host sending to the phone
    (the converter, or the server when there is none), `server_*` the server, `phone_*` the phone."""
    roles = {"phone": tb.client, "server": tb.server}
    if isinstance(system, MiMBox):
        roles["phone_sender"] = tb.mbox
    else:
        roles["phone_sender"] = tb.server
    out = {}
    for role, host in roles.items():
        for key, col in RECOVERY.items():
            out[f"{role}_{col}"] = after[host.name].get(key, 0) - before[host.name].get(key, 0)
    return out


def one_run(tb, system, seconds: float, mptcp: bool = True) -> dict:
    server_mptcp = isinstance(system, Router) and mptcp
    srv = tb.server.popen([python(tb.server), "-m", "experiments.measure.stream", "server", "--port", str(PORT), "--seconds",
                           str(seconds), *(["--mptcp"] if server_mptcp else [])], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    try:
        ready_line(srv)
        host, port = system.endpoint(tb, PORT)
        argv = system.client_argv(tb, [python(tb.client), "-m", "experiments.measure.stream", "client", host, str(port),
                                       *(["--mptcp"] if mptcp else [])], mptcp=False)
        out = tb.client.cmd(" ".join(shlex.quote(a) for a in argv))
        line = [x for x in out.splitlines() if x.startswith("{")]
        if not line:
            raise RuntimeError(f"stream through {system}: {out[-500:]}")
        return json.loads(line[-1])
    finally:
        srv.kill()
        srv.wait()


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows, fid = [], {}
    for where in ("client", "server"):
        loss = {"client_loss": params["loss"]} if where == "client" else {"server_loss": params["loss"]}
        with testbed(MobileTopo(seed=7, **loss)) as tb:
            # (measuring the shaped links takes ~1 min: a tiny run may leave it to tests/test_testbed.py)
            fid[where] = fidelity_rows(tb, seconds=2.0) if params.get("fidelity", True) else "not measured (fidelity=False)"
            b = params["buffer"]
            for host in (tb.client, tb.mbox, tb.server):
                tb.sysctl(host, "net.ipv4.tcp_rmem", f"4096 {min(b, 87380)} {b}")
                tb.sysctl(host, "net.ipv4.tcp_wmem", f"4096 16384 {b}")
            mb = MiMBox(mode="explicit")
            mb.start(tb, PORT)
            try:
                runs = [("direct (no converter)", "router", True, None), ("mimbox", "mimbox", True, None)]
                if where == "client" and params.get("variants", True):
                    runs += [(name, *v) for name, v in VARIANTS.items()]
                for rep in range(params["reps"]):
                    for name, kind, mptcp, subflows in interleave(runs, rep):
                        system = mb if kind == "mimbox" else Router()
                        hosts = (tb.client, tb.mbox, tb.server)
                        before = {h.name: counters(h) for h in hosts}
                        if subflows is not None:
                            tb.client.cmd(f"ip mptcp limits set subflow {subflows} add_addr_accepted {subflows}")
                        try:
                            r = one_run(tb, system, params["seconds"], mptcp)
                        finally:
                            if subflows is not None:
                                tb.client.cmd(f"ip mptcp limits set subflow {CLIENT_SUBFLOWS} "
                                              f"add_addr_accepted {CLIENT_SUBFLOWS}")
                        after = {h.name: counters(h) for h in hosts}
                        rows.append(dict(system=name, loss_side=where, rep=rep, **r,
                                         **recovery(tb, system, before, after)))
                        progress(f"interactive {where}-side loss, {name}: mean {r['mean_ms']:.1f} ms, "
                                 f"max {r['max_ms']:.1f} ms")
            finally:
                mb.stop()
    return pd.DataFrame(rows), {"link_fidelity": fid}


def plot(df: pd.DataFrame):
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharey=True)
    for ax, where in zip(axes, ("client", "server")):
        d = df[df.loss_side == where].groupby("system")[["mean_ms", "p99_ms", "max_ms"]].mean()
        d.plot.bar(ax=ax, rot=0)
        if where == "client":
            for i, name in enumerate(d.index):
                if name in PAPER_MAX_MS:
                    ax.plot([i + 0.17], [PAPER_MAX_MS[name]], "k*", ms=12)
            ax.plot([], [], "k*", label="paper: max delay")
        ax.set_title(f"1 % loss on the {where} side, 100 kbit/s stream", fontsize=9)
        ax.set_ylabel("application delay [ms]")
        ax.get_legend() and ax.get_legend().remove()
        ax.grid(alpha=.3, axis="y")
    from experiments.style import legend_outside
    legend_outside(fig, axes)
    return fig


def main(quick: bool = True, **overrides) -> pd.DataFrame:
    """Run this figure (quick or full parameters, overridable) into results/."""
    return run_experiment(sys.modules[__name__], quick, overrides)
