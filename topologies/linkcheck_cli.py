"""`invoke linkcheck`: measure every link of the testbed topologies and fail if one is off tolerance."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from topologies.linkcheck import check_testbed, format_table
from topologies.testbed import MobileTopo, PaperTopo, Testbed


def run(topology: str, loss: float, out: Path | None = None) -> bool:
    topos = {"paper": lambda: PaperTopo(), "mobile": lambda: MobileTopo(client_loss=loss)}
    names = list(topos) if topology == "all" else [topology]
    ok = True
    rows_all = {}
    for name in names:
        with Testbed(topos[name]()) as tb:
            rows = check_testbed(tb)
        print(f"== {name}" + (f" (client-side loss {loss:g} %)" if name == "mobile" and loss else ""))
        print(format_table(rows))
        ok &= not any(r.problems() for r in rows)
        rows_all[name] = [r.row() for r in rows]
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows_all, indent=2))
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--topology", choices=("paper", "mobile", "all"), default="all")
    ap.add_argument("--loss", type=float, default=1.0)
    ap.add_argument("--out", type=Path, help="write the measurements as JSON")
    a = ap.parse_args(argv)
    return 0 if run(a.topology, a.loss, a.out) else 1


if __name__ == "__main__":
    sys.exit(main())
