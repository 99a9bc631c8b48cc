"""What /metrics costs the connections a converter relays (issue 36, finding 4): a converter in
static mode relaying `idle` idle connections and one that measures, by 64-byte ping-pongs, the
relay's round trip; its median and p99 alone, then with 16 scrapers asking /metrics as fast as they
can. Today's build (a metrics process of its own; a scrape reads the workers' counters only, at
most every 0.5 s) against an earlier one (prometheus_client's server in the supervisor; each scrape
asks every worker for its connection list), both in one run, repetitions interleaved.

    python -m experiments.scrapers [--before COMMIT] [--quick]

Writes results/scrapers/: samples.csv (every repetition and phase), summary.json (medians of the
repetitions, the ratio with/without scrapers per build) and manifest.json (the run's environment).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import pandas as pd

from experiments.common import environment, interleave, progress
from experiments.hardening import MiMBoxBefore, build_before
from experiments.systems import PY, MiMBox
from topologies.support import ALLOCATE
from topologies.testbed import PaperTopo, Testbed

NAME = "scrapers"
ROOT = Path(__file__).resolve().parent.parent
BEFORE = "0a69d45"        # the last commit with /metrics in the supervisor
FULL = dict(idle=1000, samples=2000, reps=5, scrapers=16, settle=1.0, before=BEFORE)
QUICK = dict(idle=300, samples=1000, reps=2, scrapers=16, settle=0.5, before=BEFORE)
ECHO_PORT = 9500

ECHO = r"""
import asyncio
async def echo(r, w):
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()
async def main():
    s = await asyncio.start_server(echo, "0.0.0.0", %d, backlog=4096)
    print("listening", flush=True)
    await s.serve_forever()
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (16384, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
asyncio.run(main())
"""

CLIENT = r"""
import json, resource, socket, sys, time
via, port, idle, samples = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_NOFILE, (idle + 256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
held = []
for _ in range(idle):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    s.connect((via, port))
    s.sendall(b"x"); assert s.recv(1) == b"x"         # relayed end to end, then idle
    held.append(s)
probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
probe.connect((via, port))
print("opened", len(held), flush=True)
msg = b"p" * 64
for line in sys.stdin:
    if line.strip() != "measure":
        break
    rtts = []
    try:
        for _ in range(samples):
            t = time.perf_counter_ns()
            probe.sendall(msg)
            got = b""
            while len(got) < 64:
                d = probe.recv(64 - len(got))
                if not d:
                    raise ConnectionError("end of stream")
                got += d
            rtts.append((time.perf_counter_ns() - t) / 1000)
    except OSError as e:
        print(json.dumps({"error": repr(e)}), flush=True)
        break
    print(json.dumps(rtts), flush=True)
"""

SCRAPER = "while :; do curl -s -m 5 -o /dev/null http://127.0.0.1:{port}/metrics && echo x; done"


class Probe:
    """The idle connections and the measuring one, through one converter."""

    def __init__(self, tb, system, idle: int, samples: int):
        self.proc = tb.client.popen([PY, "-c", CLIENT, tb.mbox_client_ip, str(system.port), str(idle), str(samples)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("opened"):
            raise RuntimeError(f"{system.name}: the idle connections did not open: {line!r}")

    def measure(self) -> list[float]:
        self.proc.stdin.write("measure\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line.startswith("["):
            raise RuntimeError(f"the measuring connection failed: {line!r} (exit {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def scraping(tb, port: int, n: int) -> list:
    """`n` scrapers asking /metrics back to back (each line of their output: one scrape answered)."""
    # (mnexec -d: each a session of its own, so stop() reaches its curl too)
    return [tb.mbox.popen(["sh", "-c", SCRAPER.format(port=port)], stdout=subprocess.PIPE, text=True)
            for _ in range(n)]


def stop(scrapers: list) -> int:
    answered = 0
    for p in scrapers:
        os.killpg(p.pid, 15)
    for p in scrapers:
        out, _ = p.communicate(timeout=10)
        answered += out.count("x")
    return answered


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    tree = build_before(params["before"])
    rows = []
    with Testbed(PaperTopo()) as tb:
        echo = tb.server.popen([PY, "-c", ECHO % ECHO_PORT], stdout=subprocess.PIPE, text=True)
        assert echo.stdout.readline().strip() == "listening"
        now_port, before_port = ALLOCATE.port(), ALLOCATE.port()
        # (idle connections are the load here: no idle timeout ends them mid-run)
        systems = [MiMBox(mode="static", workers=1, extra=["--metrics", f"127.0.0.1:{now_port}", "--idle-timeout", "0"]),
                   MiMBoxBefore(tree, params["before"], mode="static", workers=1,
                                extra=["--upstream", f"{tb.server_ip}:{ECHO_PORT}", "--allow-destination",
                                       "10.0.0.0/8", "--metrics", f"127.0.0.1:{before_port}", "--idle-timeout", "0"])]
        metrics = {systems[0].name: now_port, systems[1].name: before_port}
        probes = {}
        try:
            for s in systems:
                s.start(tb, ECHO_PORT)
                probes[s.name] = Probe(tb, s, params["idle"], params["samples"])
            for rep in range(params["reps"]):
                for s in interleave(systems, rep):
                    progress(f"{NAME}: rep {rep + 1}/{params['reps']} {s.name}")
                    alone = probes[s.name].measure()
                    scrapers = scraping(tb, metrics[s.name], params["scrapers"])
                    time.sleep(params["settle"])          # the scrapers under way: a warm-up, not a wait
                    t0 = time.monotonic()
                    scraped = probes[s.name].measure()
                    took = time.monotonic() - t0
                    answered = stop(scrapers)
                    for phase, rtts in (("alone", alone), ("16 scrapers", scraped)):
                        q = statistics.quantiles(rtts, n=100)
                        rows.append(dict(system=s.name, rep=rep, phase=phase, samples=len(rtts),
                                         median_us=statistics.median(rtts), p99_us=q[98], max_us=max(rtts),
                                         scrapes_per_s=round(answered / (took + params["settle"]), 1)
                                         if phase != "alone" else 0.0))
        finally:
            for p in probes.values():
                p.close()
            for s in systems:
                s.stop()
            echo.kill()
            echo.wait(timeout=10)
    return pd.DataFrame(rows), {}


def summary(df: pd.DataFrame) -> dict:
    out = {}
    for system, d in df.groupby("system"):
        alone, scraped = d[d.phase == "alone"], d[d.phase != "alone"]
        ratios = [s / a for a, s in zip(alone.median_us, scraped.median_us)]
        out[system] = {"median_us_alone": round(statistics.median(alone.median_us), 1),
                       "median_us_16_scrapers": round(statistics.median(scraped.median_us), 1),
                       "p99_us_alone": round(statistics.median(alone.p99_us), 1),
                       "p99_us_16_scrapers": round(statistics.median(scraped.p99_us), 1),
                       "ratio_per_rep": [round(r, 2) for r in ratios],
                       "ratio_median": round(statistics.median(ratios), 2),
                       "scrapes_per_s": round(statistics.median(scraped.scrapes_per_s), 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--before", default=BEFORE)
    a = ap.parse_args(argv)
    params = dict(QUICK if a.quick else FULL, before=a.before)
    df, _ = run(params)
    out = ROOT / "results" / NAME
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "samples.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary(df), indent=2) + "\n")
    (out / "manifest.json").write_text(json.dumps({"params": params, "environment": environment()}, indent=2) + "\n")
    print(json.dumps(summary(df), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
