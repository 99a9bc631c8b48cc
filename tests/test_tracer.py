"""experiments/measure/tracer.py: the load starts only once the tracer holds every thread, and the
tracer is ended (its output kept) whatever happens in the block."""
import shutil
import subprocess
import sys

import pytest

from experiments.measure.tracer import perf_events, threads, tracer_of, tracing

# two threads making system calls all the time
BUSY = ("import os, threading, time\n"
        "def loop():\n    while True: os.getppid(); time.sleep(0.001)\n"
        "threading.Thread(target=loop, daemon=True).start()\nprint('up', flush=True)\nloop()")


@pytest.fixture
def busy():
    p = subprocess.Popen([sys.executable, "-c", BUSY], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "up"
    yield p
    p.kill()
    p.wait(timeout=10)


@pytest.mark.skipif(not shutil.which("strace"), reason="strace missing (mimbox.sh installs it)")
def test_strace_holds_every_thread_when_the_block_starts_and_its_table_is_kept(busy):
    assert len(threads([busy.pid])) == 2
    with tracing(["strace", "-c", "-f", "-q", "-p", str(busy.pid)], [busy.pid]) as t:
        assert [tracer_of(x) for x in threads([busy.pid])] == [t.pid, t.pid]
        busy_calls = subprocess.run(["sleep", "0.2"], timeout=10)       # the load (here: time passing)
        assert busy_calls.returncode == 0
    assert t.returncode is not None                      # ended with the block
    assert "getppid" in t.stderr_text and "total" in t.stderr_text, t.stderr_text
    assert [tracer_of(x) for x in threads([busy.pid])] == [0, 0]       # detached


@pytest.mark.skipif(not shutil.which("perf"), reason="perf missing (mimbox.sh installs linux-perf)")
def test_perf_holds_an_event_a_thread_when_the_block_starts(busy, tmp_path):
    data = tmp_path / "perf.data"
    with tracing(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p", str(busy.pid), "-o", str(data)],
                 [busy.pid]) as t:
        assert perf_events(t.pid) >= 2
    assert t.returncode is not None and data.stat().st_size > 0


def test_a_tracer_that_cannot_attach_is_an_error_not_a_wait(busy):
    with pytest.raises(RuntimeError, match="exited"):
        with tracing(["sh", "-c", "echo cannot attach >&2; exit 3"], [busy.pid]):
            pytest.fail("the block ran without a tracer")
