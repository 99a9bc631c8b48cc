"""`./mimbox.sh compare`: compare converters — ours, the peers, and your own — on one figure's
set-up, into a new directory (never the shipped results/), with ratios to a baseline and a check
that every system really converts.

    ./mimbox.sh compare --figure fig5 --systems router,mimbox,haproxy-1t \\
        --system socat='socat TCP-LISTEN:{listen_port},fork,reuseaddr TCP:{server}:{server_port}' \\
        --sizes 1K,16K --reps 3 --seconds 5 --baseline haproxy-1t

A `--system NAME='COMMAND'` runs COMMAND on the converter host as every system is run (pinned to
the converter's core, in its CPU box, stopped by SIGTERM): {listen_port} is where it must listen,
{server} and {server_port} where it must relay; the client connects to it with MPTCP sockets. For
more than a command line, subclass experiments.systems.System in a file of your own and give
`--system NAME=@FILE.py:CLASS` (docs/compare.md; experiments/examples/my_converter.py runs).

Every run records, per row, the MP_CAPABLE SYNs the converter host received from clients and sent
to servers (its MPTCP MIB); the report flags a converting system that took no MPTCP from clients,
or that spoke MPTCP to the (TCP) server for most connections.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from experiments import common

FIGURES = ("fig5", "percost", "fig4", "table1")
METRIC = {"fig5": "req_per_s", "percost": "req_per_s", "fig4": "goodput_gbps", "table1": "delay_us"}
KEY = {"fig5": "size", "percost": "size", "fig4": "mss", "table1": "segment"}
REGIMES = ("converter-bound", "end-host-bound")
DEFAULT_SYSTEMS = {"fig5": "router,mimbox,haproxy-1t,squid", "percost": "router,mimbox,haproxy-1t",
                   "fig4": "router,mimbox,haproxy-1t-tcp", "table1": "router,read/write,mimbox (TCP server)"}


def module(figure: str):
    from experiments import delay, goodput, percost, workload
    return {"fig5": workload, "percost": percost, "fig4": goodput, "table1": delay}[figure]


def available(figure: str) -> list[str]:
    """The systems a figure knows by name (made, not started)."""
    m = module(figure)
    if figure == "fig5":
        return list(dict.fromkeys(s.name for r in REGIMES for s in m.systems(r)))
    if figure == "table1":
        return [name for name, _, _ in m.cases(m.QUICK)]
    return [s.name for s in m.systems()]


@dataclass
class Selection:
    """Which systems a run measures, in this order: names of the figure's own, and command-line
    converters (made anew for each regime, like the figure's own)."""
    names: list[str]
    commands: dict[str, str] = field(default_factory=dict)

    def choose(self, defaults: list, names: list[str] | None = None, tb=None) -> list:
        """The chosen ones among `defaults` (called by the figure: common.pick) plus the commands,
        pinned like the figure's one-loop converters on tb (default this machine)."""
        from experiments.common import CONVERTER_CPUS
        from experiments.systems import Command
        by_name = dict(zip(names or [s.name for s in defaults], defaults))
        if tb is not None and tb.remote:
            cpus = tb.cpus("mbox")
        else:
            cpus = CONVERTER_CPUS if (os.cpu_count() or 2) == 2 else None
        out = []
        for name in self.names:
            if name in self.commands and self.commands[name].startswith("@"):
                out.append(load_class(self.commands[name])(name=name, cpus=cpus))
            elif name in self.commands:
                out.append(Command(name, self.commands[name], cpus=cpus))
            elif name in by_name:
                out.append(by_name[name])
        return out

    def __repr__(self) -> str:          # (the manifest)
        return ", ".join(f"{n}={self.commands[n]!r}" if n in self.commands else n for n in self.names)


def load_class(spec: str):
    """'@path/to/file.py:ClassName' -> that experiments.systems.System subclass."""
    import importlib.util
    import inspect

    from experiments.systems import System
    path, sep, cls = spec[1:].rpartition(":")
    if not sep or not path or not cls:
        raise ValueError(f"{spec!r}: @FILE.py:CLASS")
    if not os.path.isfile(path):
        raise ValueError(f"{spec!r}: no file {path}")
    mod_spec = importlib.util.spec_from_file_location(f"compare_system_{Path(path).stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    found = getattr(mod, cls, None)
    if not (inspect.isclass(found) and issubclass(found, System)):
        raise ValueError(f"{spec!r}: {cls} is not a subclass of experiments.systems.System")
    return found


def parse_sizes(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        t = part.strip().upper().removesuffix("B")
        try:
            mult = {"K": 1024, "M": 1 << 20}.get(t[-1:], 1)
            n = int(float(t.rstrip("KM")) * mult)
        except (ValueError, IndexError):
            raise ValueError(f"--sizes: {part!r} is not a size (e.g. 1K, 16K, 1M, 1460)") from None
        if n <= 0:
            raise ValueError(f"--sizes: {part!r} must be > 0")
        out.append(n)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="compare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--figure", choices=FIGURES, default="fig5", help="the set-up to compare on (default fig5)")
    ap.add_argument("--systems", help="comma-separated names: the figure's own (see --list) and --system ones "
                                      "(default: the figure's main ones and every --system)")
    ap.add_argument("--system", action="append", default=[], metavar="NAME='COMMAND'",
                    help="your converter as a command line with {listen_port}, {server}, {server_port} (repeatable)")
    ap.add_argument("--sizes", help="fig5/percost: response sizes (1K,16K,...); fig4: MSS values")
    ap.add_argument("--reps", type=int, help="repetitions (interleaved; < 3 gives a warning)")
    ap.add_argument("--seconds", type=int, help="seconds per measurement (a whole number)")
    ap.add_argument("--regime", choices=REGIMES, help="fig5/fig4: only this regime (default: converter-bound)")
    ap.add_argument("--out", type=Path, help="results directory (default: runs/compare-<time>; never results/)")
    ap.add_argument("--baseline", help="a system every other one is divided by (ratios.csv)")
    ap.add_argument("--quota", type=float, metavar="CORES", help="converter-bound: this CPU quota per event loop "
                    "(default: the figure's, fig5 and percost calibrate it on the testbed)")
    ap.add_argument("--quick", action="store_true", help="the figure's quick parameters as the base")
    ap.add_argument("--list", action="store_true", help="list the figure's systems and exit")
    ap.add_argument("--hosts", metavar="FILE.toml", help="run on the machines of this hosts file over SSH "
                                                        "(docs/remote.md; default: Mininet on this machine)")
    return ap.parse_args(argv)


def plan(a: argparse.Namespace) -> tuple[dict, Selection, Path]:
    """Check everything before any namespace is made: (parameter overrides, selection, out dir).
    ValueError with a clear message for anything wrong."""
    from experiments.systems import Command
    commands = {}
    for text in a.system:
        name, sep, command = text.partition("=")
        name = name.strip()
        if not sep or not name or not command.strip():
            raise ValueError(f"--system {text!r}: NAME='COMMAND with {{listen_port}} {{server}} {{server_port}}'")
        if command.startswith("@"):
            load_class(command)            # the file and class checked here
        else:
            Command(name, command)         # placeholders checked here
        commands[name] = command
    known = available(a.figure)
    if set(commands) & set(known):
        raise ValueError(f"--system {sorted(set(commands) & set(known))[0]!r}: a name the figure already has")
    names = [n.strip() for n in (a.systems or ",".join([DEFAULT_SYSTEMS[a.figure], *commands])).split(",") if n.strip()]
    for n in names:
        if n not in known and n not in commands:
            raise ValueError(f"--systems: no system {n!r} in {a.figure} (its systems: {', '.join(known)}; "
                             "or define it with --system NAME='COMMAND')")
    if a.baseline and a.baseline not in names:
        raise ValueError(f"--baseline {a.baseline!r} is not among the systems compared ({', '.join(names)})")
    m = module(a.figure)
    base = m.QUICK if a.quick else m.FULL
    over: dict = {"systems": Selection(names, commands)}
    for flag, value, not_table1 in (
            ("reps", a.reps, "--reps: table1 has one run of --measures bursts per system, not repetitions"),
            ("seconds", a.seconds, "--seconds does not apply to table1 (it sends a fixed number of bursts)")):
        if value is None:
            continue
        if value < 1:
            raise ValueError(f"--{flag} must be a whole number >= 1")
        if a.figure == "table1":
            raise ValueError(not_table1)
        over[flag] = value
    if a.quota is not None:
        if a.figure == "table1":
            raise ValueError("--quota does not apply to table1 (no CPU quota)")
        if not 0.01 <= a.quota <= 64:
            raise ValueError(f"--quota {a.quota}: cores per event loop, 0.01 to 64")
        over["quota_cores"] = a.quota
    regime = a.regime or "converter-bound"
    if (regime == "converter-bound" and a.quota is None and a.figure in ("fig4", "fig5") and "router" not in names
            and base.get("quota_cores") == "auto"):
        raise ValueError("the converter-bound quota is calibrated against the router (no converter): add router "
                         "to --systems, or give --quota CORES")
    if a.figure in ("percost", "table1") and a.regime:
        raise ValueError(f"--regime does not apply to {a.figure} ({'converter-bound only' if a.figure == 'percost' else 'no CPU quota'})")
    if a.figure == "fig5":
        sizes = parse_sizes(a.sizes) if a.sizes else base["sizes"][regime]
        over["sizes"] = {regime: sizes}
    elif a.figure == "fig4":
        mss = parse_sizes(a.sizes) if a.sizes else base["mss"][regime]
        if any(not 88 <= x <= 1460 for x in mss):
            raise ValueError("--sizes for fig4 are MSS values in 88..1460")
        over["mss"] = {regime: mss}
        over["offload_point"] = False
    elif a.figure == "percost":
        if a.sizes:
            sizes = parse_sizes(a.sizes)
            if len(sizes) != 1:
                raise ValueError("percost measures one size: --sizes N")
            over["size"] = sizes[0]
    elif a.sizes:
        raise ValueError("--sizes does not apply to table1")
    out = (a.out or common.ROOT / "runs" / f"compare-{datetime.datetime.now():%Y%m%d-%H%M%S}").resolve()
    shipped = (common.ROOT / "results").resolve()
    if out == shipped or (out.parent == shipped and (shipped / out.name).exists()):
        raise ValueError(f"--out {out}: the shipped results/ or one of its figures (give a new directory)")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: not empty (a comparison writes a directory of its own)")
    return over, over["systems"], out


def ratios(df: pd.DataFrame, figure: str, baseline: str) -> pd.DataFrame:
    """Each system's mean metric over the baseline's, per regime and point."""
    metric, key = METRIC[figure], KEY[figure]
    group = [c for c in ("regime", "idle", key) if c in df]
    mean = df.groupby([*group, "system"], sort=False)[metric].mean().reset_index()
    base = mean[mean.system == baseline].drop(columns="system").rename(columns={metric: "baseline"})
    out = mean.merge(base, on=group)
    out[f"{metric}_vs_{baseline}"] = (out[metric] / out["baseline"]).round(3)
    return out.drop(columns="baseline")


def conversion_flags(df: pd.DataFrame, converting: set[str]) -> list[str]:
    """Systems that do not convert: no MPTCP from clients, or MPTCP to the server for most connections."""
    if "mptcp_syns_from_clients" not in df:
        return []
    flags = []
    for name, g in df.groupby("system", sort=False):
        if name not in converting:
            continue
        rx = int(g.mptcp_syns_from_clients.sum())
        tcp_server = g[~g.server_mptcp.astype(bool)] if "server_mptcp" in g else g    # Table 1 has MPTCP-server cases
        tx = int(tcp_server.mptcp_syns_to_servers.sum())
        if rx == 0:
            flags.append(f"{name}: took no MPTCP connection from the clients (0 MP_CAPABLE SYNs received): "
                         "its listener is plain TCP, so it does not convert")
        if tx > 0.5 * max(rx, 1):
            flags.append(f"{name}: sent {tx} MP_CAPABLE SYNs towards the TCP server for {rx} MPTCP clients: "
                         "it speaks MPTCP to the server (as `mptcpize run` makes every socket MPTCP)")
    return flags


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        if a.list:
            print("\n".join(available(a.figure)))
            return 0
        over, selection, out = plan(a)
    except ValueError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    if a.hosts and a.figure == "table1" and "idle" not in over:
        over["idle"] = ["halt"]    # the poll regime sets this machine's cpuidle, not a remote host's
    out.mkdir(parents=True, exist_ok=True)
    common.RESULTS = out          # this run's results; the shipped results/ and README untouched
    m = module(a.figure)
    common.progress(f"compare {a.figure}: {selection!r} -> {out}" + (f" on the hosts of {a.hosts}" if a.hosts else ""))
    failed = None
    try:
        with common.remote_lab(a.hosts):
            df = common.run_experiment(m, a.quick, over)
    except common.RunFailed as e:
        failed = str(e)
        df = pd.read_csv(out / m.NAME / "data.csv")
    except common.LAB_ERRORS as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    converting = {s for s in df.system.unique() if s != "router"}
    report = []
    reps = int(df.groupby("system").rep.nunique().min()) if "rep" in df else None
    if reps is not None and reps < 3:
        report.append(f"warning: {reps} repetition{'s' * (reps != 1)} per point: no reliable error bars (use --reps 3 or more)")
    report += [f"does not convert: {f}" for f in conversion_flags(df, converting)]
    if failed:
        report.append(f"run not valid: {failed}")
    metric, key = METRIC[a.figure], KEY[a.figure]
    group = [c for c in ("regime", "idle", key) if c in df]
    cols = [c for c in (metric, "cpu_us_per_req", "cpu_s_per_gb", "mptcp_syns_from_clients", "mptcp_syns_to_servers")
            if c in df]
    table = df.groupby([*group, "system"], sort=False)[cols].mean().round(2).reset_index()
    table.to_csv(out / "summary.csv", index=False)
    print(table.to_string(index=False))
    if a.baseline:
        r = ratios(df, a.figure, a.baseline)
        r.to_csv(out / "ratios.csv", index=False)
        print()
        print(r.to_string(index=False))
    (out / "report.txt").write_text("\n".join(report) + "\n" if report else "")
    for line in report:
        print(line)
    print(f"results: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
