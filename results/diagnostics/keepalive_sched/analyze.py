"""From `perf sched record -C 1` over a concurrency run: each converter's event loop's scheduling
delay (runnable until it ran: perf sched timehist's "sch delay") over its point, against the
keep-alive p99 the run measured. A loop is the converter task with the most switch-ins on CPU 1."""
import collections
import re
import subprocess
import sys

data, log = sys.argv[1], sys.argv[2]
text = subprocess.run(["perf", "sched", "timehist", "-i", data], capture_output=True, text=True).stdout
rows = []
for line in text.splitlines()[3:]:
    f = line.split()
    try:
        rows.append((float(f[0]), f[2], float(f[4])))     # time, task[tid], sch delay (ms)
    except (IndexError, ValueError):
        continue
busiest = collections.Counter(name for _, name, _ in rows if not name.startswith(("<idle>", "rcu", "kworker",
                                                                                  "ksoftirqd", "python", "migration")))
print("keep-alive p99 as the run measured it:")
for m in re.finditer(r"concurrency end-host-bound (\S+) N=(\d+):.*?keep-alive p99 ([\d.]+) ms.*?converter (\d+) ms", open(log).read()):
    print(f"  {m.group(1)} N={m.group(2)}: p99 {m.group(3)} ms (the figure's converter run-queue wait: {m.group(4)} ms/s, every process of its box)")
print("the event loops' scheduling delay on CPU 1 (perf sched timehist), whole point:")
for name, n in busiest.most_common(2):
    d = sorted(x for _, t, x in rows if t == name)
    span = [t for t, k, _ in rows if k == name]
    q = lambda p: d[min(len(d) - 1, int(p * len(d)))]  # noqa: E731
    print(f"  {name}: {len(d)} switch-ins over {span[-1] - span[0]:.1f} s; sch delay p99 {q(.99):.3f} ms, "
          f"p99.9 {q(.999):.3f} ms, max {d[-1]:.3f} ms, total {sum(d):.1f} ms")
