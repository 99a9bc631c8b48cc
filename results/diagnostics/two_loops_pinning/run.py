"""mimbox-2w: workers floating on 0,1 vs one worker per core; haproxy-2t likewise (threads); 1-loop baselines."""
import os, subprocess, sys, time
from experiments import servers
from experiments.common import running
from experiments.measure.tools import wrk
from experiments.systems import HAProxy, MiMBox
from topologies.regimes import CONVERTER_BOUND
from topologies.testbed import PaperTopo, Testbed

Q = float(sys.argv[2]) if len(sys.argv) > 2 else 0.125

def loops(s):
    """the event-loop tasks: MiMBox's worker processes (busiest), HAProxy's threads"""
    tids = []
    for p in s.box.pids():
        for t in os.listdir(f"/proc/{p}/task"):
            comm = open(f"/proc/{p}/task/{t}/comm").read().strip()
            if comm != "mimbox-keeper":
                st = open(f"/proc/{p}/task/{t}/stat").read().rsplit(")", 1)[1].split()
                tids.append((int(st[11]) + int(st[12]), int(t)))
    return [t for _, t in sorted(tids, reverse=True)[:2]]

tb = Testbed(PaperTopo()).start()
res = {}
try:
    web = servers.nginx(tb, [1024], 80, mptcp=False, cpus=tb.cpus("server"))
    for rep in range(int(sys.argv[1])):
        cases = [("mimbox-1w", lambda: MiMBox(mode="explicit", cpus="1", workers=1), False),
                 ("mimbox-2w", lambda: MiMBox(mode="explicit", cpus="0,1", workers=2), False),
                 ("mimbox-2w-pinned", lambda: MiMBox(mode="explicit", cpus="0,1", workers=2), True),
                 ("haproxy-1t", lambda: HAProxy(threads=1, cpus="1"), False),
                 ("haproxy-2t", lambda: HAProxy(threads=2, cpus="0,1"), False),
                 ("haproxy-2t-pinned", lambda: HAProxy(threads=2, cpus="0,1"), True)]
        k = rep % len(cases)
        for name, mk, pin in cases[k:] + cases[:k]:
            s = mk()
            with running(tb, [s], CONVERTER_BOUND, Q, 80):
                wrk(tb, s, 80, "/1024.bin", 1, 40, cpus=tb.cpus("client"))      # warm: workers busy
                if pin:
                    for cpu, t in zip((0, 1), loops(s)):
                        subprocess.run(["taskset", "-pc", str(cpu), str(t)], check=True, capture_output=True)
                u0 = s.cpu_s()
                r = wrk(tb, s, 80, "/1024.bin", 5, 40, cpus=tb.cpus("client"))
                u1 = s.cpu_s()
                res.setdefault(name, []).append((r["req_per_s"], 1e6 * (u1 - u0) / r["requests"]))
                print(f"rep {rep} {name}: {r['req_per_s']:.0f} req/s {1e6*(u1-u0)/r['requests']:.0f} us/req", flush=True)
    web.stop()
finally:
    tb.stop()
import statistics as st
for n, v in res.items():
    print(n, round(st.mean(x for x, _ in v)), round(st.mean(y for _, y in v)))
for a, b in (("mimbox-2w", "mimbox-1w"), ("mimbox-2w-pinned", "mimbox-1w"), ("haproxy-2t", "haproxy-1t"), ("haproxy-2t-pinned", "haproxy-1t")):
    rs = [x[0] / y[0] for x, y in zip(res[a], res[b])]
    print(f"{a}/{b}: {st.mean(rs):.2f} +- {st.stdev(rs):.2f} per rep {[round(x, 2) for x in rs]}")
