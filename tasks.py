"""invoke tasks: thin; each calls one function of mimbox/, topologies/ or experiments/."""
from __future__ import annotations

import os
import sys

from invoke import task

ROOT = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable


@task(help={"force": "rebuild even if up to date"})
def build(c, force=False):
    """Build the core, the LD_PRELOAD shims (MPTCP, RFC 8803 client), the BPF programs and the fuzz
    harnesses into build/ (native/build.py: the same recipe the wheel uses)."""
    c.run(f"{PY} native/build.py build --fuzz {'--force' if force else ''}")
    c.run("mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf", warn=True)


@task
def wheel(c):
    """Build the converter's wheel into dist/ (its core, shims and BPF objects inside: docs/operating.md)."""
    c.run(f"{PY} -m pip wheel --no-deps --no-build-isolation -w dist .", pty=False)


@task(pre=[build])
def doctor(c):
    """Probe the kernel and tools (one line per capability; non-zero exit if something needed is missing)."""
    c.run(f"{PY} -m mimbox.ops.cli doctor --testbed", pty=False)


def _unprivileged(c, user="nobody"):
    """The prefix that runs a command as an unprivileged user, if this checkout is readable by one
    (the unit and core tests need no privilege: run so, a test that silently relies on root fails).
    Empty when not root or when the checkout is not readable by that user (e.g. under /root)."""
    if os.geteuid() != 0:
        return ""
    probe = c.run(f"runuser -u {user} -- test -r {ROOT}/tests/conftest.py -a -x {PY}", warn=True, hide=True)
    if not probe.ok:
        print(f"tasks: {ROOT} is not readable by {user}: the unit and core tests run as root", file=sys.stderr)
        return ""
    return f"runuser -u {user} -- "


@task(pre=[build], help={"slow": "also run the slow fidelity/soak tests", "k": "pytest -k expression"})
def test(c, slow=False, k=""):
    """Run the test suite (as root: it builds real namespaces). The converter's decision logic and
    its C core first (seconds, a failure there stops the run), then everything else."""
    marker = "" if not slow else "-m ''"
    kexpr = f"-k '{k}'" if k else ""
    first = "tests/unit tests/test_core.py"
    c.run(f"{_unprivileged(c)}{PY} -m pytest -p no:cacheprovider {marker} {kexpr} {first}", pty=False)
    # the 25 slowest in the log: where the suite's time goes (CI keeps it under 15 minutes)
    c.run(f"{PY} -m pytest --durations=25 {marker} {kexpr} " + " ".join(f"--ignore={p}" for p in first.split()),
          pty=False)


@task(help={"topology": "paper | mobile | all", "loss": "client-side loss (percent) for the mobile topology"})
def linkcheck(c, topology="all", loss=1.0):
    """Measure every emulated link (rate, RTT, loss) and fail if one is off its tolerance."""
    c.run(f"{PY} -m topologies.linkcheck_cli --topology {topology} --loss {loss}", pty=False)


@task
def clean(c):
    """Remove anything a crashed run may have left (like `mn -c`): hosts, delay lines, converters, rules."""
    c.run(f"{PY} -m topologies.cleanup", pty=False)


@task(pre=[build], help={"quick": "fewer points and repetitions (the README's main job)",
                         "hosts": "a hosts file: run on those machines over SSH (docs/remote.md)",
                         "only": "only this figure (repeatable)"}, iterable=["only"])
def reproduce(c, quick=False, hosts="", only=None):
    """Reproduce every figure of the paper into results/ (with --hosts: on real machines, results/remote/)."""
    import shlex
    args = (["--quick"] if quick else []) + (["--hosts", hosts] if hosts else []) + \
        [x for o in only or [] for x in ("--only", o)]
    c.run(f"{PY} -m experiments.reproduce {' '.join(shlex.quote(x) for x in args)}", pty=False)


@task(pre=[build], help={"quick": "fewer repetitions and bursts"})
def remote_example(c, quick=False):
    """Fig. 5's 1 KB point and Table 1 locally and over SSH on the SSH rig, side by side (results/remote_example)."""
    c.run(f"{PY} -m experiments.remote_example {'--quick' if quick else ''}", pty=False)


@task(pre=[build], help={"figure": "fig5 | percost | fig4 | table1", "systems": "comma-separated names",
                         "system": "NAME='COMMAND with {listen_port} {server} {server_port}' (repeatable)",
                         "sizes": "e.g. 1K,16K (fig4: MSS values)", "reps": "repetitions", "seconds": "per measurement",
                         "regime": "converter-bound | end-host-bound", "out": "results directory (never results/)",
                         "baseline": "a system to divide every other one by", "list": "list the figure's systems",
                         "hosts": "a hosts file: compare on those machines over SSH (docs/remote.md)",
                         "quick": "the figure's quick parameters as the base",
                         "quota": "converter-bound: CPU quota per event loop in cores (default: calibrated)"},
      iterable=["system"])
def compare(c, figure="fig5", systems="", system=None, sizes="", reps=0, seconds=0, regime="", out="", baseline="",
            list=False, hosts="", quick=False, quota=""):
    """Compare converters (ours, the peers, your own command line) on one figure's set-up: experiments/compare.py."""
    import shlex
    args = ["--figure", figure]
    for flag, value in (("--systems", systems), ("--sizes", sizes), ("--reps", reps), ("--seconds", seconds),
                        ("--regime", regime), ("--out", out), ("--baseline", baseline), ("--hosts", hosts),
                        ("--quota", quota)):
        if value:
            args += [flag, str(value)]
    for s in system or []:
        args += ["--system", s]
    if list:
        args.append("--list")
    if quick:
        args.append("--quick")
    c.run(f"{PY} -m experiments.compare {' '.join(shlex.quote(x) for x in args)}", pty=False)


@task(pre=[build], help={"slow": "the long variants too (full integrity matrix, 10k idle, 100k short)"})
def reliability(c, slow=False):
    """Reliability and security suite; writes results/reliability/summary.json for docs/results.md."""
    marker = "-m ''" if slow else ""
    c.run(f"MIMBOX_RELIABILITY_SUMMARY=results/reliability/summary.json {PY} -m pytest {marker} "
          "tests/test_reliability.py tests/test_dstopt.py tests/test_flood.py tests/test_scaleout.py "
          "tests/test_convert_mode.py tests/unit/test_convert.py tests/test_hostile.py tests/test_fuzz.py", pty=False, warn=True)
    c.run(f"{PY} -m experiments.report", pty=False)
