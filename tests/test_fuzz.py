"""libFuzzer with AddressSanitizer and UndefinedBehaviorSanitizer on the core's SYN parser and SYN
handler (tests/fuzz/fuzz_core.c, built by `./mimbox.sh build`): a bounded run of each in the default
suite, from the committed seed corpus (new inputs go to a temporary directory, not the corpus).
MIMBOX_FUZZ_SECONDS sets the bound (default 8 s each: > 10,000 inputs; `./mimbox.sh test --slow` or
MIMBOX_FUZZ_SECONDS=600 for a longer run)."""
from __future__ import annotations

import os
import re
import subprocess

import ledger
import pytest

from mimbox.paths import BUILD

CORPUS = os.path.join(os.path.dirname(__file__), "fuzz", "corpus")
SECONDS = int(os.environ.get("MIMBOX_FUZZ_SECONDS", "8"))


@pytest.mark.parametrize("target", ["parser", "handler"])
def test_fuzz_the_syn_path(target, tmp_path):
    exe = BUILD / "fuzz" / target
    assert exe.exists(), f"{exe} is missing: `./mimbox.sh build` makes it (clang, libclang-rt-14-dev)"
    new = tmp_path / "new"
    new.mkdir()
    argv = [str(exe), str(new), os.path.join(CORPUS, target), f"-max_total_time={SECONDS}", "-seed=20131209",
            "-print_final_stats=1", f"-artifact_prefix={tmp_path}/", "-max_len=128", "-timeout=10"]
    if target == "handler":
        # held SYNs connect() to 10/8 (the harness's policy): in a namespace of its own, whose only
        # route there is a veth nobody answers on, so a held SYN stays held until the harness ends it
        argv = ["unshare", "-n", "sh", "-c", "ip link add v0 type veth peer name v1 && ip addr add 10.255.255.1/8 "
                "dev v0 && ip link set v0 up && ip link set v1 up && exec \"$0\" \"$@\"", *argv]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=SECONDS + 120)
    tail = p.stderr[-4000:]
    assert p.returncode == 0, f"{target}: exit {p.returncode} (crash inputs in {tmp_path})\n{tail}"
    runs = int(re.search(r"stat::number_of_executed_units:\s*(\d+)", p.stderr).group(1))
    assert runs > 10_000, tail
    if target == "handler":           # SYNs were held (server connect in progress), not only refused
        assert int(re.search(r"stat::held_table_filled:\s*(\d+)", p.stderr).group(1)) > 10, tail
    ledger.add(inputs=runs)
