"""Where do the 2-loop converters' loops run, and how often do they switch/migrate (fig5 1 KB, quota 0.125/loop)."""
import subprocess, threading, time, collections, sys
from experiments import servers
from experiments.common import running
from experiments.measure.tools import wrk
from experiments.systems import HAProxy, MiMBox
from topologies.regimes import CONVERTER_BOUND
from topologies.testbed import PaperTopo, Testbed

def tids(pids):
    out = []
    for p in pids:
        try:
            import os
            out += [(p, int(t)) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            pass
    return out

def sample(pids, stop, acc):
    while not stop.is_set():
        for p, t in tids(pids):
            try:
                f = open(f"/proc/{p}/task/{t}/stat").read().rsplit(")", 1)[1].split()
                acc[(t, f[0])][int(f[36])] += 1      # state, processor (field 39)
            except OSError:
                pass
        time.sleep(0.005)

def ctx(pids):
    tot = collections.Counter()
    for p, t in tids(pids):
        for line in open(f"/proc/{p}/task/{t}/status"):
            if "ctxt_switches" in line:
                k, v = line.split(":"); tot[k] += int(v)
        tot["migr"] += int(open(f"/proc/{p}/task/{t}/sched").read().split("se.nr_migrations")[1].split(":")[1].split()[0])
    return tot

tb = Testbed(PaperTopo()).start()
try:
    web = servers.nginx(tb, [1024], 80, mptcp=False, cpus=tb.cpus("server"))
    for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
        for mk in (lambda: MiMBox(mode="explicit", cpus="0,1", workers=2), lambda: HAProxy(threads=2, cpus="0,1"),
                   lambda: MiMBox(mode="explicit", cpus="1", workers=1), lambda: HAProxy(threads=1, cpus="1")):
            s = mk()
            with running(tb, [s], CONVERTER_BOUND, 0.125, 80):
                time.sleep(1)
                pids = s.box.pids()
                c0, u0 = ctx(pids), s.cpu_s()
                acc = collections.defaultdict(collections.Counter)
                stop = threading.Event(); th = threading.Thread(target=sample, args=(pids, stop, acc)); th.start()
                r = wrk(tb, s, 80, "/1024.bin", 5, 40, cpus=tb.cpus("client"))
                stop.set(); th.join()
                c1, u1 = ctx(pids), s.cpu_s()
                n = r["requests"]
                print(f"{s.name}: {r['req_per_s']:.0f} req/s, {1e6*(u1-u0)/n:.0f} us/req, "
                      f"vol cs/req {(c1['voluntary_ctxt_switches']-c0['voluntary_ctxt_switches'])/n:.2f}, "
                      f"invol cs/req {(c1['nonvoluntary_ctxt_switches']-c0['nonvoluntary_ctxt_switches'])/n:.2f}, "
                      f"migr {c1['migr']-c0['migr']}", flush=True)
                for (t, st), cpus in sorted(acc.items()):
                    if st == "R":
                        print(f"   tid {t} running on {dict(cpus)}")
    web.stop()
finally:
    tb.stop()
