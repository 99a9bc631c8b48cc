"""The machine's regimes (topologies.regimes): a CPU quota that holds every process of a system,
and idle polling that is always put back."""
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import SERVER_PORT, readline

from experiments.common import converter_boxes
from experiments.systems import MiMBox, Squid
from topologies.support import wait_until
from topologies import regimes
from topologies.regimes import CONVERTER_BOUND, END_HOST_BOUND, CpuQuota, IdlePolling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cgroups_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def quota_available() -> bool:
    try:
        CpuQuota("probe", 0.5).create().remove()
        return True
    except regimes.QuotaUnavailable:
        return False


needs_quota = pytest.mark.skipif(not quota_available(), reason="no cgroup cpu controller to set a quota with")


@needs_quota
def test_quota_holds_every_process_of_a_system(paper_tb):
    """Workers of MiMBox and Squid's processes: all in their system's group (read from /proc),
    the quota as asked; the groups are gone afterwards."""
    syss = [MiMBox(mode="static", workers=2), Squid()]
    with converter_boxes(syss, CONVERTER_BOUND, cores=0.3) as described:
        boxes = [s.box for s in syss]
        try:
            for s in syss:
                s.start(paper_tb, SERVER_PORT)
            for s, loops in zip(syss, (2, 1)):
                want = 3 if s is syss[0] else 1          # MiMBox: supervisor + 2 workers
                pids = wait_until(lambda: (lambda ps: ps if len(ps) >= want else None)(
                    [q for p in s.procs for q in descendants(p.pid)]), 10, f"{s.name}'s processes")
                for pid in pids:
                    assert s.box.name in cgroups_of(pid), (s.name, pid, cgroups_of(pid))
                assert set(pids) <= set(s.box.pids())
                assert s.box.quota_us == int(0.3 * loops * 100_000)
            burnt = syss[0].cpu_s()
            assert burnt > 0
        finally:
            for s in syss:
                s.stop()
    assert described["regime"] == CONVERTER_BOUND and described["quota_us_per_loop"] == 30_000
    for b in boxes:
        assert b.dirs == []
    leftovers = [d for base in (regimes.V1_CPU, regimes.V1_CPUACCT, *regimes.V2_ROOTS) if base.is_dir()
                 for d in base.glob(f"mimbox-quota-{os.getpid()}-*")]
    assert leftovers == []


@needs_quota
def test_quota_limits_cpu():
    """A busy loop in a 20 % group gets about 20 % of a core, not 100 %."""
    q = CpuQuota("busy", 0.2).create()
    try:
        p = subprocess.Popen(q.wrap([sys.executable, "-c", "while True: pass"]))
        q.admit(p.pid)
        time.sleep(2.0)
        used = q.usage_s()
        p.kill()
        p.wait()
        assert 0.2 < used < 0.7, used
        assert q.throttled()["throttled"] > 0
    finally:
        q.remove()
    assert q.dirs == []


@needs_quota
def test_end_host_bound_box_only_counts():
    syss = [MiMBox()]
    with converter_boxes(syss, END_HOST_BOUND) as described:
        assert syss[0].box.quota_us == -1
    assert described["cgroup"] == "accounting only" and syss[0].box is None


needs_haltpoll = pytest.mark.skipif(not IdlePolling.available(),
                                    reason="no writable cpuidle haltpoll parameters (not a KVM guest with haltpoll)")

CHILD = """
import signal, sys, time
sys.path.insert(0, {root!r})
from topologies.regimes import IdlePolling
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with IdlePolling(ns=123456):
    print("polling", flush=True)
    time.sleep(60)
"""


@needs_haltpoll
@pytest.mark.parametrize("how", ["exit", "SIGTERM", "SIGINT", "SIGKILL then clean"])
def test_idle_polling_is_always_restored(how):
    before = regimes.haltpoll_now()
    if how == "exit":
        with IdlePolling(ns=123456) as idle:
            assert regimes.haltpoll_now() == {"guest_halt_poll_ns": "123456", "guest_halt_poll_allow_shrink": "N"}
            assert idle.describe()["idle"] == "poll"
    else:
        p = subprocess.Popen([sys.executable, "-c", CHILD.format(root=ROOT)], stdout=subprocess.PIPE)
        try:
            assert readline(p).strip() == "polling"
            assert regimes.haltpoll_now()["guest_halt_poll_ns"] == "123456"
            p.send_signal({"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}.get(how, signal.SIGKILL))
            p.wait(timeout=10)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        if how.startswith("SIGKILL"):
            assert regimes.haltpoll_now()["guest_halt_poll_ns"] == "123456"   # nothing ran to restore it
            assert any("restored haltpoll" in line for line in regimes.cleanup_leftovers())
    assert regimes.haltpoll_now() == before
