"""The machine's regimes: how much CPU the converter box has, and how an idle core sleeps.

    quota = CpuQuota("mimbox", cores=0.25)      # the converter box: a quarter of one core
    p = host.popen(quota.wrap(["haproxy", "-f", cfg]))
    quota.admit(p.pid)                          # it, and every process it starts, inside
    quota.usage_s()                             # CPU seconds the group used (exited children included)
    quota.remove()

    with IdlePolling(ns=200_000):               # idle cores poll 200 µs before halting (restored on exit)
        ...

On one shared machine the end hosts' core caps every system (Fig. 5's router does at 1 KB what
the converters do); a quota on the converter's processes puts the bottleneck where the paper's
testbed had it, on the converter box. Both classes undo what they set, also after an exception,
Ctrl-C or SIGTERM (topologies.testbed turns SIGTERM into SystemExit), and `mimbox.sh clean`
removes what a killed run left (cleanup_leftovers).
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import time
from pathlib import Path

from topologies.support import NotWithin, wait_until

PREFIX = "mimbox-quota-"
V1_CPU, V1_CPUACCT = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup/cpuacct")
V2_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup"))
HALTPOLL = Path("/sys/module/haltpoll/parameters")
HALTPOLL_SAVED = Path("/run/mimbox/haltpoll.saved.json")

END_HOST_BOUND, CONVERTER_BOUND = "end-host-bound", "converter-bound"
HALT, POLL = "halt", "poll"


class QuotaUnavailable(RuntimeError):
    """Neither cgroup v2's cpu controller nor cgroup v1's cpu controller can be used here."""


def _v2_root() -> Path | None:
    for root in V2_ROOTS:
        try:
            if "cpu" in (root / "cgroup.controllers").read_text().split():
                return root
        except OSError:
            continue
    return None


class CpuQuota:
    """One cgroup holding a system's processes to `cores` CPUs' worth of time (CFS bandwidth).

    cgroup v2 (`cpu.max`) where its cpu controller is enabled, else cgroup v1 (`cpu.cfs_quota_us`,
    with a cpuacct group beside it for the usage). Processes enter at exec, through `wrap()`, so
    nothing runs a moment outside the quota and every child inherits it."""
    _made = 0

    def __init__(self, name: str, cores: float | None, period_us: int = 100_000):
        """cores None: no limit, the group only counts CPU time (the end-host-bound regime)."""
        if cores is not None and cores <= 0:
            raise ValueError(f"a CPU quota needs cores > 0, not {cores}")
        CpuQuota._made += 1
        self.name = f"{PREFIX}{os.getpid()}-{CpuQuota._made}-{name}"
        self.cores, self.period_us = cores, period_us
        self.quota_us = -1 if cores is None else max(1000, int(cores * period_us))
        self.dirs: list[Path] = []
        self.version = 0

    def create(self) -> "CpuQuota":
        """Make the group(s) and set the quota; raises QuotaUnavailable with the reason."""
        root = _v2_root()
        try:
            if root is not None:
                d = root / self.name
                d.mkdir()
                self.dirs = [d]
                (d / "cpu.max").write_text(f"{'max' if self.quota_us < 0 else self.quota_us} {self.period_us}")
                self.version = 2
            elif (V1_CPU / "cpu.cfs_quota_us").exists():
                for base in (V1_CPU, V1_CPUACCT):
                    if base.is_dir():
                        (base / self.name).mkdir()
                        self.dirs.append(base / self.name)
                (V1_CPU / self.name / "cpu.cfs_period_us").write_text(str(self.period_us))
                (V1_CPU / self.name / "cpu.cfs_quota_us").write_text(str(self.quota_us))
                self.version = 1
            else:
                raise QuotaUnavailable("no cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us)")
        except OSError as e:
            self.remove()
            raise QuotaUnavailable(f"cannot set a CPU quota: {e}") from e
        atexit.register(self.remove)
        return self

    def set_cores(self, cores: float) -> None:
        """Change the quota of a group that exists (its processes stay in it)."""
        if cores <= 0:
            raise ValueError(f"a CPU quota needs cores > 0, not {cores}")
        self.cores, self.quota_us = cores, max(1000, int(cores * self.period_us))
        if self.version == 2:
            (self.dirs[0] / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
        elif self.version == 1:
            (V1_CPU / self.name / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        else:
            raise QuotaUnavailable("the group was not created")

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` made to wait, stopped, until admit() has put it in the group: a Mininet host has
        its own mount namespace without the cgroup file systems, so the group is joined from here."""
        return ["sh", "-c", 'kill -STOP $$; exec "$@"', "sh", *argv]

    def admit(self, pid: int, timeout: float = 10.0) -> None:
        """Put the stopped process `pid` (started with wrap()) in the group, then let it run."""
        def stopped() -> bool:
            state = _state(pid)
            if state in ("", "Z", "X"):
                raise QuotaUnavailable(f"process {pid} did not wait for its CPU group ({state or 'gone'})")
            return state in ("T", "t")
        try:
            wait_until(stopped, timeout, f"process {pid} stopped for its CPU group", every=0.001)
        except NotWithin:
            raise QuotaUnavailable(f"process {pid} did not wait for its CPU group ({_state(pid) or 'gone'})") from None
        for d in self.dirs:
            (d / "cgroup.procs").write_text(str(pid))
        os.kill(pid, signal.SIGCONT)

    def pids(self) -> list[int]:
        """Every process now in the group."""
        try:
            return [int(x) for x in (self.dirs[0] / "cgroup.procs").read_text().split()]
        except (OSError, IndexError):
            return []

    def usage_s(self) -> float:
        """CPU seconds used by the group's processes since it was made (exited ones included)."""
        if self.version == 2:
            for line in (self.dirs[0] / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        for d in self.dirs:
            if (d / "cpuacct.usage").exists():
                return int((d / "cpuacct.usage").read_text()) / 1e9
        raise QuotaUnavailable("no CPU usage counter for the group")

    def throttled(self) -> dict:
        """How often the quota bit: periods, throttled periods, throttled seconds."""
        stat = {}
        for d in self.dirs:
            if (d / "cpu.stat").exists():
                stat = dict(line.split() for line in (d / "cpu.stat").read_text().splitlines())
                break
        ns = int(stat.get("throttled_time", 0)) or 1000 * int(stat.get("throttled_usec", 0))
        return {"periods": int(stat.get("nr_periods", 0)), "throttled": int(stat.get("nr_throttled", 0)),
                "throttled_s": ns / 1e9}

    def describe(self) -> dict:
        """What goes into a run's manifest."""
        return {"cores": self.cores, "quota_us": self.quota_us, "period_us": self.period_us,
                "cgroup": f"v{self.version}"}

    def remove(self) -> None:
        """Move anything still inside to the parent group and remove the group(s) (idempotent)."""
        for d in reversed(self.dirs):
            _remove_group(d)
        self.dirs = []


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _remove_group(d: Path) -> None:
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            try:
                for pid in (d / "cgroup.procs").read_text().split():
                    try:
                        (d.parent / "cgroup.procs").write_text(pid)
                    except OSError:
                        pass      # gone meanwhile
            except OSError:
                return
            time.sleep(0.02)


class IdlePolling:
    """While active, an idle core polls for `ns` before it halts (cpuidle haltpoll), so a wake-up
    is not a VM exit; the previous settings are saved to a file first and always restored.

    A no-op (active=False, with the reason) where the haltpoll driver is absent."""

    KEYS = ("guest_halt_poll_ns", "guest_halt_poll_allow_shrink")

    def __init__(self, ns: int = 200_000):
        self.ns = ns
        self.saved: dict[str, str] | None = None
        self.reason = ""

    @staticmethod
    def available() -> bool:
        """True when haltpoll's parameters are there and writable."""
        return all(os.access(HALTPOLL / k, os.W_OK) for k in IdlePolling.KEYS)

    def __enter__(self) -> "IdlePolling":
        if not self.available():
            self.reason = f"{HALTPOLL} is absent or read-only"
            return self
        self.saved = {k: (HALTPOLL / k).read_text().strip() for k in self.KEYS}
        HALTPOLL_SAVED.parent.mkdir(parents=True, exist_ok=True)
        HALTPOLL_SAVED.write_text(json.dumps({"pid": os.getpid(), "settings": self.saved}))  # for a SIGKILL
        atexit.register(self.restore)
        (HALTPOLL / "guest_halt_poll_allow_shrink").write_text("N")
        (HALTPOLL / "guest_halt_poll_ns").write_text(str(self.ns))
        return self

    @property
    def active(self) -> bool:
        return self.saved is not None

    def describe(self) -> dict:
        """What goes into a run's manifest."""
        if not self.active:
            return {"idle": HALT, "polling": False, "reason": self.reason}
        return {"idle": POLL, "guest_halt_poll_ns": self.ns, "guest_halt_poll_allow_shrink": "N",
                "restored_to": self.saved}

    def restore(self) -> None:
        """Put the saved settings back (idempotent)."""
        if self.saved is not None:
            restore_haltpoll(self.saved)
            self.saved = None

    def __exit__(self, *exc) -> None:
        self.restore()


def restore_haltpoll(saved: dict[str, str]) -> None:
    # shrink back on last, so the poll time cannot shrink before it is set back
    for k in ("guest_halt_poll_ns", "guest_halt_poll_allow_shrink"):
        if k in saved:
            (HALTPOLL / k).write_text(saved[k])
    HALTPOLL_SAVED.unlink(missing_ok=True)


def haltpoll_now() -> dict:
    """The current idle settings (for manifests)."""
    out = {}
    for k in IdlePolling.KEYS:
        try:
            out[k] = (HALTPOLL / k).read_text().strip()
        except OSError:
            out[k] = "unknown"
    return out


def cpu_ticks(proc_stat: str | None = None) -> tuple[int, int]:
    """(steal, all) CPU ticks since boot, all cores, from /proc/stat (or its text): the share of a
    VM's time its host took. Stolen time is time no process, softirq or shaper of ours ran."""
    try:
        if proc_stat is None:
            with open("/proc/stat") as f:
                proc_stat = f.readline()
        v = [int(x) for x in proc_stat.split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (v[7] if len(v) > 7 else 0), sum(v[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    """The host's share of the CPU between two cpu_ticks() readings (None: no tick in between)."""
    (steal0, all0), (steal1, all1) = before, after
    return (steal1 - steal0) / (all1 - all0) if all1 > all0 else None


def cleanup_leftovers() -> list[str]:
    """Remove quota groups of processes that are gone and restore idle settings a killed run left;
    returns what was done."""
    done = []
    bases = [V1_CPU, V1_CPUACCT, *V2_ROOTS]
    for base in bases:
        if not base.is_dir():
            continue
        for d in base.glob(f"{PREFIX}*"):
            pid = d.name[len(PREFIX):].split("-", 1)[0]
            if pid.isdigit() and Path(f"/proc/{pid}").exists():
                continue     # a running experiment's group
            _remove_group(d)
            done.append(f"removed {d}")
    if HALTPOLL_SAVED.exists():
        try:
            saved = json.loads(HALTPOLL_SAVED.read_text())
            if not Path(f"/proc/{saved['pid']}").exists():
                restore_haltpoll(saved["settings"])
                done.append(f"restored haltpoll {saved['settings']}")
        except (OSError, ValueError, KeyError) as e:
            done.append(f"could not restore haltpoll from {HALTPOLL_SAVED}: {e}")
    return done
