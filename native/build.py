"""Build the converter's native parts into one directory: the one recipe for `invoke build` (into
build/ of a checkout) and for the wheel (setup.py, into the package's mimbox/_native/).

    python native/build.py OUT_DIR [--force] [--fuzz]

What it makes (mimbox.paths finds them):
    OUT/librelaycore.so          the per-connection core (native/core/*.c), with OUT/relaycore.h
    OUT/libmptcpize.so           LD_PRELOAD shim: a program's TCP sockets become MPTCP
    OUT/libconvertize.so         LD_PRELOAD shim: RFC 8803 client (OUT/convert.h from mimbox.wire.rfc8803)
    OUT/bpf/dstopt_*.bpf.o       the client's DST_OPT writer and the converter's SYN recorder
    OUT/bpf/synack_opts.bpf.o    convert mode: the servers' SYN-ACK options (mimbox.host.synack)
    OUT/fuzz/{parser,handler}    (--fuzz) libFuzzer harnesses of the core's SYN parser and handler

The generated headers come from the Python that declares the layouts (mimbox.converter.layouts, mimbox.wire.dstopt,
mimbox.host.synack, mimbox.wire.rfc8803),
run from this source tree; only the standard library is needed to build. Needs gcc, clang (BPF
target), libnetfilter-queue-dev, liburing-dev and libbpf-dev (Debian names).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent          # the source tree (setup.py's directory)
CORE = SRC / "native" / "core"                         # the core's rooms (core.h maps them)
WARNINGS = ["-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter"]


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print(" ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, cwd=SRC, **kw)


def _header(module: str) -> str:
    """A generated header: `python -m MODULE --header`, from this tree, no site packages needed."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.run([sys.executable, "-m", module, "--header"], check=True, cwd=SRC, env=env,
                          capture_output=True, text=True).stdout


def _stale(target: Path, *sources: Path) -> bool:
    return not target.exists() or target.stat().st_mtime < max(s.stat().st_mtime for s in sources)


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def build(out: Path, force: bool = False, fuzz: bool = False) -> None:
    """Make every artefact in `out` that is missing or older than its sources."""
    out = Path(out).resolve()
    (out / "bpf").mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / "bpf" / "dstopt.h", _header("mimbox.wire.dstopt"))
    _write_if_changed(out / "bpf" / "synack.h", _header("mimbox.host.synack"))
    _write_if_changed(out / "relaycore.h", _header("mimbox.converter.layouts"))
    _write_if_changed(out / "convert.h", _header("mimbox.wire.rfc8803"))
    arch_inc = f"/usr/include/{platform.machine()}-linux-gnu"
    for name in ("dstopt_client", "dstopt_server", "synack_opts"):
        obj, src = out / "bpf" / f"{name}.bpf.o", SRC / "mimbox" / "bpf" / f"{name}.bpf.c"
        if force or _stale(obj, src, out / "bpf" / "dstopt.h", out / "bpf" / "synack.h"):
            _run(["clang", "-O2", "-g", "-target", "bpf", "-Wall", "-I", str(out / "bpf"), "-I", arch_inc,
                  "-c", str(src), "-o", str(obj)])
    for lib, src, libs in (("libmptcpize.so", "mptcpize.c", ["-ldl"]), ("libconvertize.so", "convertize.c", ["-ldl"])):
        if force or _stale(out / lib, SRC / "native" / src, out / "convert.h"):
            _run(["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-I", str(out), "-o", str(out / lib), str(SRC / "native" / src),
                  *libs])
    core = out / "librelaycore.so"
    rooms = sorted(CORE.glob("*.c"))
    inputs = [*rooms, *CORE.glob("*.h"), out / "relaycore.h", out / "bpf" / "dstopt.h", out / "bpf" / "synack.h"]
    if force or _stale(core, *inputs):
        # one job per file, linked with -flto so calls between rooms inline as in one file; only the
        # exports of core.h are visible
        _run(["gcc", "-O2", "-flto", "-shared", "-fPIC", "-fvisibility=hidden", *WARNINGS, "-I", str(out / "bpf"),
              "-I", str(out), "-o", str(core), *map(str, rooms), "-lnetfilter_queue", "-luring"])
    if fuzz:
        (out / "fuzz").mkdir(exist_ok=True)
        harness = SRC / "tests" / "fuzz" / "fuzz_core.c"
        for target in ("parser", "handler"):
            exe = out / "fuzz" / target
            if force or _stale(exe, harness, *inputs):
                _run(["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=undefined",
                      "-I", str(out), "-I", str(out / "bpf"), "-I", str(CORE), f"-DFUZZ_{target.upper()}",
                      str(harness), *map(str, rooms), "-luring", "-o", str(exe)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--fuzz", action="store_true", help="also the libFuzzer harnesses (clang's libclang-rt)")
    a = ap.parse_args(argv)
    build(a.out, a.force, a.fuzz)
    return 0


if __name__ == "__main__":
    sys.exit(main())
