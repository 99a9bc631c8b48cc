"""`invoke reproduce [--quick]`: every figure of the paper, one after the other, into results/,
then docs/results.md and README's headline regenerated from results/ (experiments.report)."""
from __future__ import annotations

import argparse
import sys
import time
import traceback

from experiments import (
    breakdown,
    buffers,
    concurrency,
    delay,
    families,
    goodput,
    interactive,
    percost,
    profile,
    report,
    scaleout,
    tfostall,
    uring,
    workload,
)
from experiments import common
from experiments.common import progress

# table1's poll regime sets this machine's cpuidle, not a remote host's
REMOTE_OVERRIDES = {"table1": {"idle": ["halt"]}}

# the figures a remote testbed runs (--hosts), on the hosts' own interfaces: fig6 and interactive
# shape them there (HTB, netem: a host without sch_netem is refused with the reason); concurrency
# holds its crowd on the client and measures the converter host's kernel. The others build
# topologies of their own (scaleout, families) or trace this machine's kernel (breakdown, profile,
# tfostall, uring's perf): Mininet only.
REMOTE_FIGURES = ("fig5", "table1", "fig6", "interactive", "concurrency")
FIGURES = {"fig5": workload, "percost": percost, "fig4": goodput, "table1": delay, "breakdown": breakdown,
           "fig6": buffers, "interactive": interactive, "profile": profile, "scaleout": scaleout,
           "tfostall": tfostall, "families": families,
           "uring": uring, "concurrency": concurrency}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    ap.add_argument("--only", action="append", choices=list(FIGURES), help="run only these (repeatable)")
    ap.add_argument("--hosts", metavar="FILE.toml", help="run on the machines of this hosts file over SSH "
                    f"(docs/remote.md): the figures {', '.join(REMOTE_FIGURES)}, into results/remote/")
    a = ap.parse_args(argv)
    failed = []
    t0 = time.monotonic()
    chosen = [n for n in FIGURES if not a.only or n in a.only]
    if a.hosts:
        local_only = [n for n in chosen if n not in REMOTE_FIGURES]
        if a.only and local_only:
            print(f"reproduce: {', '.join(local_only)} run on this machine only (remote: {', '.join(REMOTE_FIGURES)})",
                  file=sys.stderr)
            return 2
        chosen = [n for n in chosen if n in REMOTE_FIGURES]
        common.RESULTS = common.RESULTS / "remote"     # never mixed with this machine's figures
    try:
        with common.remote_lab(a.hosts):
            for name in chosen:
                progress(f"== {name} ({'quick' if a.quick else 'full'})" + (f" on {a.hosts}" if a.hosts else ""))
                try:
                    FIGURES[name].main(quick=a.quick, **(REMOTE_OVERRIDES.get(name, {}) if a.hosts else {}))
                except (KeyboardInterrupt, SystemExit) as e:
                    progress("interrupted: testbed torn down, results/ of this figure left as they were")
                    return 130 if isinstance(e, KeyboardInterrupt) else (e.code or 143)
                except common.LAB_ERRORS as e:       # e.g. a host that cannot shape this figure's links
                    progress(f"{name}: refused: {e}")
                    failed.append(name)
                except Exception:  # noqa: BLE001 - one figure failing must not hide the others
                    traceback.print_exc()
                    failed.append(name)
    except common.LAB_ERRORS as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    if not a.hosts:
        report.update_readme()
    progress(f"done in {(time.monotonic() - t0) / 60:.1f} min" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
