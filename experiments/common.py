"""What every experiment shares: where results go, the run's environment, progress, interleaving."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(os.environ.get("MIMBOX_RESULTS", ROOT / "results"))
END_HOST_CPUS = "0"    # client and server processes: one core ...
CONVERTER_CPUS = "1"   # ... the converter the other, like the paper's separate boxes


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
        pass
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
        "python": platform.python_version(), "mimbox_commit": commit,
        "versions": {
            "haproxy": _first_line(["haproxy", "-v"]), "squid": _first_line(["squid", "-v"]),
            "nginx": _first_line(["nginx", "-v"]), "wrk": _first_line(["wrk", "-v"]),
            "iperf3": _first_line(["iperf3", "-v"]), "mininet": _first_line(["mn", "--version"]),
        },
        "pinning": {"end_hosts": END_HOST_CPUS, "converter": CONVERTER_CPUS},
        "cpuidle": _cpuidle(),
    }


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
    """The measured link fidelity of the topology used (goes into the manifest)."""
    from topologies.linkcheck import check_testbed
    return [r.row() for r in check_testbed(tb, seconds=seconds)]


def run_experiment(module, quick: bool, overrides: dict) -> pd.DataFrame:
    """The same path for every figure: params -> module.run (topology, runs) -> CSV, figure, manifest.

    Optional hooks of the module: `findings(df) -> dict` (into the manifest) and
    `tables(df) -> {name: DataFrame}` (extra CSV files beside data.csv)."""
    params = dict(module.QUICK if quick else module.FULL, **overrides)
    df, extra = module.run(params)
    out = Run(module.NAME, params, extra)
    findings = module.findings(df) if hasattr(module, "findings") else None
    out.save(df, module.plot(df), **({"findings": findings} if findings is not None else {}))
    for name, table in (module.tables(df) if hasattr(module, "tables") else {}).items():
        table.to_csv(out.dir / f"{name}.csv", index=False)
    return df
