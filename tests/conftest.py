"""Shared set-up for the tests: real namespaces (Mininet), real kernel MPTCP, cleanup always.

Like the kernel's MPTCP selftests: one library of set-up/teardown and counters, features probed by
trying, and a missing kernel feature is a SKIP with the reason (never a pass).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mimbox.host import kernel
from topologies.support import free_port

PY = sys.executable
# the server side's port of the byte-checked transfers (transfer(), and every converter started towards it)
SERVER_PORT = free_port()


NO_ROOT = ("tests/unit", "tests/test_core.py")


def pytest_configure(config):
    # the unit tests and the core's loopback tests need no privilege (CI runs them as nobody first)
    unprivileged = config.args and all(str(a).startswith(NO_ROOT) for a in config.args)
    if os.geteuid() != 0 and not unprivileged:
        pytest.exit("the tests build network namespaces: run them as root", returncode=2)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """MIMBOX_EXPECT_ALL=1 (set by .ci/run): a skip for a missing build or kernel feature is a
    failure. CI runs on the machine every feature is expected on; a skip there hides a regression."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MIMBOX_EXPECT_ALL") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but MIMBOX_EXPECT_ALL=1 expects every feature here: {reason}"


def pytest_sessionfinish(session, exitstatus):
    """`invoke reliability` asks for a summary file: counts from the ledger plus pytest's outcome."""
    path = os.environ.get("MIMBOX_RELIABILITY_SUMMARY")
    if not path:
        return
    import ledger
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = {k: len(v) for k, v in (tr.stats.items() if tr else []) if k in ("passed", "failed", "skipped", "error")}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**ledger.totals, "faults_by_kind": dict(ledger.faults), "tests": stats, "seed": os.environ.get("MIMBOX_SEED", "20131209"),
                   "measurements": ledger.measurements}, f, indent=2)


def readline(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """The next line a child prints; fails the test (instead of hanging the suite) after `timeout`."""
    import select
    if not select.select([proc.stdout], [], [], timeout)[0]:
        raise AssertionError(f"no output from {proc.args!r} within {timeout:g}s")
    line = proc.stdout.readline()
    return line.decode(errors="replace") if isinstance(line, bytes) else line


def require(ok: bool, reason: str):
    if not ok:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def mptcp_ok():
    require(kernel.mptcp_socket_works(), "kernel has no MPTCP sockets")


@pytest.fixture(scope="module")
def paper_tb(mptcp_ok):
    """Fig. 3 testbed, with a second server path so the converter's server side can use 2 subflows."""
    from topologies.testbed import PaperTopo, Testbed
    with Testbed(PaperTopo(server_paths=2)) as tb:
        yield tb


class Server:
    """An xfer server on the testbed's server host, with its JSON reports."""

    def __init__(self, tb, port: int, mptcp: bool, count: int = 1, wait_subflows: int = 0):
        """Listens on the server's IPv6 address too when `tb` is a view with an IPv6 server."""
        argv = [PY, "-m", "experiments.measure.xfer", "server", "--port", str(port), "--count", str(count),
                "--bind", "::" if getattr(tb, "server_family", 4) == 6 else "0.0.0.0"]
        if mptcp:
            argv.append("--mptcp")
        if wait_subflows:
            argv += ["--wait-subflows", str(wait_subflows)]
        self.proc = tb.server.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = readline(self.proc)
        assert "listening" in first, self.proc.stderr.read()

    def reports(self, timeout: float = 60) -> list[dict]:
        out, err = self.proc.communicate(timeout=timeout)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def run_client(tb, system, port: int, up: int, down: int, order: str = "both", mptcp: bool = True,
               wait_subflows: int = 0, timeout: float = 120) -> dict:
    """Run the xfer client on tb.client through `system`; return its JSON report."""
    host, p = system.endpoint(tb, port)
    argv = [PY, "-m", "experiments.measure.xfer", "client", host, str(p), "--up", str(up), "--down", str(down),
            "--order", order]
    if mptcp:
        argv.append("--mptcp")
    if wait_subflows:
        argv += ["--wait-subflows", str(wait_subflows)]
    argv = system.client_argv(tb, argv, mptcp)
    proc = tb.client.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert lines, f"client printed nothing: {err}"
    return json.loads(lines[-1])


def transfer(tb, system, up: int, down: int, order: str = "both", client_mptcp: bool = True,
             server_mptcp: bool = False, port: int = SERVER_PORT, wait_subflows: int = 0,
             server_wait_subflows: int = 0) -> tuple[dict, dict]:
    """One byte-checked transfer through `system`; asserts every byte arrived intact both ways."""
    srv = Server(tb, port, server_mptcp, wait_subflows=server_wait_subflows)
    try:
        c = run_client(tb, system, port, up, down, order, client_mptcp, wait_subflows)
        assert "error" not in c, c
        (s,) = srv.reports()
    finally:
        srv.kill()
    assert "error" not in s, s
    assert c["sent"] == up and s["received"] == up, (c, s)
    assert s["sent"] == down and c["received"] == down, (c, s)
    assert c["sha_sent"] == s["sha_received"], "upload corrupted"
    assert s["sha_sent"] == c["sha_received"] == c["expected_server_sha"], "download corrupted"
    import ledger
    ledger.add(bytes_compared=up + down)      # what was compared, not what a test says it compared
    return c, s


def pytest_report_header(config):
    """Who runs the tests (CI runs the unit and core tests as nobody, the rest as root)."""
    import pwd
    return f"user: {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
