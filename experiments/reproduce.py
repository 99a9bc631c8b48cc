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
from experiments.common import progress

FIGURES = {"fig5": workload, "percost": percost, "fig4": goodput, "table1": delay, "breakdown": breakdown,
           "fig6": buffers, "interactive": interactive, "profile": profile, "scaleout": scaleout,
           "tfostall": tfostall, "families": families,
           "uring": uring}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="fewer points and repetitions")
    ap.add_argument("--only", action="append", choices=list(FIGURES), help="run only these (repeatable)")
    a = ap.parse_args(argv)
    failed = []
    t0 = time.monotonic()
    for name, module in FIGURES.items():
        if a.only and name not in a.only:
            continue
        progress(f"== {name} ({'quick' if a.quick else 'full'})")
        try:
            module.main(quick=a.quick)
        except (KeyboardInterrupt, SystemExit) as e:
            progress("interrupted: testbed torn down, results/ of this figure left as they were")
            return 130 if isinstance(e, KeyboardInterrupt) else (e.code or 143)
        except Exception:  # noqa: BLE001 - one figure failing must not hide the others
            traceback.print_exc()
            failed.append(name)
    report.update_readme()
    progress(f"done in {(time.monotonic() - t0) / 60:.1f} min" + (f"; FAILED: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
