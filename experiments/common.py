"""What every experiment shares: where results go, the run's environment, progress, interleaving."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from topologies.regimes import cpu_ticks, steal_share

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("MIMBOX_RESULTS", ROOT / "results"))
END_HOST_CPUS = "0"    # client and server processes: one core ...
CONVERTER_CPUS = "1"   # ... the converter the other, like the paper's separate boxes
# The converter-bound regime's box: a quarter of one core per event loop. Measured here, the router
# path then delivers >= 2x every converter's 1 KB rate (checked in every run: bound_check).
CONVERTER_QUOTA_CORES = 0.25


def _first_line(cmd: list[str]) -> str:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return ((p.stdout or "") + (p.stderr or "")).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not found"


def environment() -> dict:
    """The run's environment: date, kernel, CPU, versions of every peer, our commit."""
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass                  # unreadable: the CPU model stays unknown
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    describe = _first_line(["git", "-C", str(ROOT), "describe", "--always", "--dirty"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "mimbox_commit": commit, "mimbox_describe": describe,
        "mimbox_diff_sha1": _diff_hash() if describe.endswith("-dirty") else None,
        "versions": {
            "haproxy": _first_line(["haproxy", "-v"]), "squid": _first_line(["squid", "-v"]),
            "nginx": _first_line(["nginx", "-v"]), "wrk": _first_line(["wrk", "-v"]),
            "iperf3": _first_line(["iperf3", "-v"]), "mininet": _first_line(["mn", "--version"]),
        },
        "pinning": {"end_hosts": END_HOST_CPUS, "converter": CONVERTER_CPUS},
        "cpuidle": _cpuidle(),
    }


def _diff_hash() -> str | None:
    """sha1 of `git diff HEAD`: which uncommitted changes a run ran with (manifest)."""
    import hashlib
    try:
        diff = subprocess.run(["git", "-C", str(ROOT), "diff", "HEAD"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return hashlib.sha1(diff).hexdigest()


def _cpuidle() -> dict:
    """How an idle core sleeps: in a VM, a halt is a VM exit, and waking a waiting process costs it."""
    def read(path: str) -> str:
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return "unknown"
    return {"driver": read("/sys/devices/system/cpu/cpuidle/current_driver"),
            "guest_halt_poll_ns": read("/sys/module/haltpoll/parameters/guest_halt_poll_ns")}


@dataclass
class Run:
    """One experiment's output directory: data.csv, figure.png/.pdf, manifest.json."""
    name: str
    params: dict
    manifest: dict = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return RESULTS / self.name

    def save(self, df: pd.DataFrame, fig=None, **extra) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        df.to_csv(self.dir / "data.csv", index=False)
        if fig is not None:
            fig.savefig(self.dir / "figure.png", dpi=130, bbox_inches="tight")
            fig.savefig(self.dir / "figure.pdf", bbox_inches="tight")
        man = {"experiment": self.name, "params": self.params, "environment": environment(), **self.manifest,
               **extra}
        (self.dir / "manifest.json").write_text(json.dumps(man, indent=2, default=str))
        return self.dir


def interleave(systems: list, rep: int) -> list:
    """A, B, C in repetition 0; B, C, A in 1; ...: no system always runs first."""
    k = rep % len(systems)
    return systems[k:] + systems[:k]


def progress(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", flush=True)


# two-sided 95 % Student t critical values, by degrees of freedom
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student t)."""
    import math
    import statistics
    v = [float(x) for x in values]
    if len(v) < 2:
        return (v[0] if v else float("nan")), 0.0
    df = len(v) - 1
    t = _T95[max(k for k in _T95 if k <= df)]  # the next smaller df: conservative
    return statistics.fmean(v), t * statistics.stdev(v) / math.sqrt(len(v))


def fidelity_rows(tb, seconds: float = 1.0) -> list[dict]:
    """The measured link fidelity of the topology used (goes into the manifest); on a remote
    testbed's real links, each path's round-trip time."""
    if getattr(tb, "remote", False):
        return tb.path_rtts()
    from topologies.linkcheck import check_testbed
    return [r.row() for r in check_testbed(tb, seconds=seconds)]


class RunFailed(RuntimeError):
    """A run finished but its data says it is not valid (e.g. a peer dropped connections)."""


from topologies.hostsfile import HostsFileError  # noqa: E402
from topologies.lab import LabRefused  # noqa: E402

LAB_ERRORS = (HostsFileError, LabRefused)   # a hosts file or a host that cannot be used: exit 2, nothing run

# The remote testbed of `--hosts` (a topologies.lab.RemoteLab, connected and installed), or None:
# every figure then builds its Mininet topology on this machine. Set by reproduce and compare.
REMOTE = None


@contextlib.contextmanager
def remote_lab(hosts_file: str | None, needs=None):
    """With a hosts file: connect to its hosts, preflight, install, and make every figure run there
    (testbed()) until the block ends; then every host is left as it was. Without: nothing changes.
    Raises topologies.hostsfile.HostsFileError or topologies.lab.LabRefused (nothing started)."""
    global REMOTE
    if not hosts_file:
        yield None
        return
    from topologies.hostsfile import load
    from topologies.lab import RemoteLab
    lab = RemoteLab(load(hosts_file)).open(needs)
    REMOTE = lab
    try:
        yield lab
    finally:
        REMOTE = None
        lab.close()


def testbed(topo):
    """The figure's testbed for `topo`: Mininet on this machine, or the hosts of `--hosts` (the same
    names and operations: topologies.testbed.Testbed, topologies.remotebed.RemoteTestbed)."""
    from topologies.testbed import Testbed
    if REMOTE is None:
        return Testbed(topo)
    from topologies.remotebed import RemoteTestbed
    return RemoteTestbed(REMOTE, topo)


@contextlib.contextmanager
def converter_boxes(systems: list, regime: str, cores: float = CONVERTER_QUOTA_CORES, host=None):
    """Give each converting system its own CPU box for `regime` (before it starts), and remove the
    boxes afterwards whatever happens. converter-bound: `cores` per event loop of the system
    (HAProxy with N threads, MiMBox with N workers get N x cores); end-host-bound: no limit, the box
    only counts CPU time. The router has none: forwarding runs in the kernel's softirqs. host: the
    converter host whose cgroups hold the boxes (default this machine)."""
    from topologies.regimes import CONVERTER_BOUND, CpuQuota
    boxes = []
    try:
        for s in systems:
            if s.converts:
                limit = cores * s.loops if regime == CONVERTER_BOUND else None
                name = s.name.replace("/", "")
                s.box = host.cpu_quota(name, limit) if host is not None else CpuQuota(name, limit).create()
                boxes.append(s.box)
        if regime == CONVERTER_BOUND and boxes:
            yield {"regime": regime, "cores_per_loop": cores, "quota_us_per_loop": int(cores * boxes[0].period_us),
                   "period_us": boxes[0].period_us, "cgroup": f"v{boxes[0].version}",
                   "quota_us": {s.name: s.box.quota_us for s in systems if s.box is not None}}
        else:
            yield {"regime": regime, "cgroup": "accounting only"}
    finally:
        for s in systems:
            s.box = None
        for b in boxes:
            b.remove()


@contextlib.contextmanager
def running(tb, systems: list, regime: str, cores: float, server_port: int):
    """The systems started on tb in their CPU boxes for `regime` (converter_boxes), stopped and the
    boxes removed afterwards whatever happens; yields the boxes' description for the manifest."""
    with converter_boxes(systems, regime, CONVERTER_QUOTA_CORES if cores == AUTO else cores, tb.mbox) as box:
        try:
            for s in systems:
                s.start(tb, server_port)
            yield box
        finally:
            for s in systems:
                s.stop()


AUTO = "auto"          # quota_cores: calibrated on this machine at the start of the run (calibrate_quota)
BOUND_MARGIN = 2.2     # calibration aims above bound_check's 2x: a short probe's rate moves by ~5-10 %
QUOTA_FLOOR = 0.05     # below this a 100 ms period leaves 5 ms slices: the quota itself becomes the noise


def calibrate_quota(systems: list, probe, points: list, start: float = CONVERTER_QUOTA_CORES,
                    floor: float = QUOTA_FLOOR, margin: float = BOUND_MARGIN, rounds: int = 3,
                    probe_with: tuple[str, ...] = ()) -> dict:
    """The largest quota per event loop, at most `start`, at which the router still delivers
    `margin` x what the largest converter of the run could deliver at every point (bound_check's
    test, with room for the noise of a short probe), and set it on every converter's box (N loops:
    N x that quota, as converter_boxes). What an N-loop converter could deliver is N x the best
    one-loop converter's rate (scaling perfectly: the most it can ask of the end hosts), so a run
    with 2-loop systems gets half the quota of a run without: a 2-loop system at 80 % of the
    router's rate measures the end hosts, not itself. `systems`: running, in their boxes, the
    router among them; probe(system, point) -> rate. A converter held to a quota delivers in
    proportion to it, so each round scales the quota by what the worst point lacks, then measures
    again; the result says what was probed. A machine where even `floor` is not converter-bound is
    reported (bound: False), not hidden. probe_with: probe only the converters of these names (those
    with the least work per request) when any is running; every system's box gets the result all
    the same."""
    from experiments.systems import Router
    router = next(s for s in systems if isinstance(s, Router))
    convs = [s for s in systems if s.converts and s.loops == 1 and s.box is not None]
    convs = [s for s in convs if s.name in probe_with] or convs
    loops = max((s.loops for s in systems if s.converts and s.box is not None), default=1)
    cores, steps = start, []

    def apply(q: float) -> None:
        for s in systems:
            if s.box is not None and s.box.cores is not None:
                s.box.set_cores(q * s.loops)

    routed = {p: probe(router, p) for p in points}
    for _ in range(rounds):
        apply(cores)
        best = {p: max(probe(s, p) for s in convs) for p in points}
        ratio = min(routed[p] / best[p] for p in points if best[p] > 0)
        steps.append({"cores_per_loop": cores, "router_over_best": round(ratio, 2),
                      "router": {str(p): round(routed[p]) for p in points},
                      "best_converter": {str(p): round(best[p]) for p in points}})
        progress(f"calibration: {cores:.3f} core per loop -> router {ratio:.2f}x the best converter"
                 + (f" (needs {margin * loops:.1f}x: {loops}-loop systems run too)" if loops > 1 else ""))
        if ratio >= margin * loops or cores <= floor:
            break
        cores = max(floor, int(cores * ratio / (margin * loops) * 1000) / 1000)
    apply(cores)
    return {"cores_per_loop": cores, "converter_bound": steps[-1]["router_over_best"] >= 2.0 * loops,
            "largest_loops": loops, "margin": margin, "start": start, "floor": floor, "probes": steps}


def pick(defaults: list, params: dict, tb=None) -> list:
    """The systems a run measures: the figure's own, or the selection `params["systems"]` makes of
    them (experiments.compare: named ones, and command-line converters, pinned as tb's converter)."""
    chooser = params.get("systems")
    return chooser.choose(defaults, tb=tb) if chooser is not None else defaults


MIB = ("MPTcpExtMPCapableSYNRX", "MPTcpExtMPCapableSYNTX")


def mptcp_mib(host) -> dict[str, int]:
    """The converter host's MPTCP counters that say whether a system converts: MP_CAPABLE SYNs
    received (clients that got an MPTCP socket) and sent (MPTCP towards the server)."""
    text = host.cmd("cat /proc/net/netstat")
    lines = [x.split() for x in text.splitlines() if x.startswith("MPTcpExt:")]
    out = {k: 0 for k in MIB}
    if len(lines) >= 2:
        values = dict(zip(lines[0][1:], lines[1][1:]))
        out.update({k: int(values.get(k.removeprefix("MPTcpExt"), 0)) for k in MIB})
    return out


def conversion(before: dict, after: dict) -> dict:
    """Row columns from two mptcp_mib() readings around a run."""
    return {"mptcp_syns_from_clients": after["MPTcpExtMPCapableSYNRX"] - before["MPTcpExtMPCapableSYNRX"],
            "mptcp_syns_to_servers": after["MPTcpExtMPCapableSYNTX"] - before["MPTcpExtMPCapableSYNTX"]}


def syn_counts(systems: list, keys=("syns", "deferred", "accepted")) -> dict:
    """Per MiMBox of `systems` (running), how many SYNs visited it and how many connections it took."""
    from experiments.systems import MiMBox
    return {s.name: {k: s.stats().get(k) for k in keys} for s in systems if isinstance(s, MiMBox)}


def bound_check(df: pd.DataFrame, metric: str, key: str = "size") -> list[dict]:
    """Per point of the converter-bound regime and per number of event loops: the router's rate over
    the best converter's with that many loops (N-loop systems have N quotas). >= 2 means the
    converters, not the end hosts, were the bottleneck there; a 2-loop system at 80 % of the router
    is not converter-bound, whatever its one-loop peers were."""
    out = []
    cb = df[df["regime"] == "converter-bound"]
    if "loops" not in cb:
        cb = cb.assign(loops=1)
    for k, g in cb.groupby(key):
        means = g.groupby("system")[metric].mean()
        if "router" not in means:
            continue
        loops = g.groupby("system")["loops"].first()
        for n in sorted({int(v) for s, v in loops.items() if s != "router" and v == v}):
            conv = means[[s for s in means.index if s != "router" and loops.get(s) == n]]
            if conv.empty:
                continue
            ratio = float(means["router"] / conv.max())
            out.append({key: k, "loops": n, "router": float(means["router"]), "best_converter": conv.idxmax(),
                        "best_rate": float(conv.max()), "router_over_best": round(ratio, 2),
                        "converter_bound": ratio >= 2.0})
    return out


def run_experiment(module, quick: bool, overrides: dict, name: str | None = None) -> pd.DataFrame:
    """The same path for every figure: params -> module.run (topology, runs) -> CSV, figure, manifest.

    Optional hooks of the module: `findings(df) -> dict` (into the manifest) and
    `tables(df) -> {name: DataFrame}` (extra CSV files beside data.csv). name: the results/
    directory (default the module's NAME)."""
    params = dict(module.QUICK if quick else module.FULL, **overrides)
    ticks0 = REMOTE.cpu_ticks() if REMOTE is not None else {"local": cpu_ticks()}
    df, extra = module.run(params)
    # a VM's host may take CPU time from it mid-run: absolute rates then shift, same-run ratios less
    ticks1 = REMOTE.cpu_ticks() if REMOTE is not None else {"local": cpu_ticks()}
    steal = {k: steal_share(ticks0[k], ticks1[k]) for k in ticks0}
    steal = {k: round(v, 3) if v is not None else None for k, v in steal.items()}
    if REMOTE is None:
        extra["cpu_steal_share"] = steal["local"]
    else:     # each host's own share; "remote" says where every measurement was taken
        extra["cpu_steal_share"] = max((v for v in steal.values() if v is not None), default=None)
        extra["remote"] = {"hosts_file": REMOTE.lab.path, "cpu_steal_share": steal, "hosts": REMOTE.facts()}
    out = Run(name or module.NAME, params, extra)
    findings = module.findings(df) if hasattr(module, "findings") else None
    problems = module.problems(df) if hasattr(module, "problems") else []
    out.save(df, module.plot(df), **({"findings": findings} if findings is not None else {}),
             **({"problems": problems} if problems else {}))      # README says so beside the data
    for name, table in (module.tables(df) if hasattr(module, "tables") else {}).items():
        table.to_csv(out.dir / f"{name}.csv", index=False)
    if problems:
        raise RunFailed(f"{module.NAME}: the data is saved in {out.dir}, but the run is not valid:\n  "
                        + "\n  ".join(problems))
    return df
