"""Clear start-up errors (mimbox.converter.startup): not root, a port in use, an NFQUEUE in use, a kernel
without MPTCP — one line each naming what is missing and how to fix it, exit code 2, no traceback;
`mimbox --debug run` keeps the traceback. Each case runs in a network namespace of its own."""
from __future__ import annotations

import os
import subprocess

import pytest
from conftest import PY
from topologies.support import free_port, free_queues

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = f"{PY} -m mimbox.ops.cli run --mode static --upstream 127.0.0.2:80 --workers 1"
# (each case in a namespace of its own: one port and one queue serve them all)
PORT, OTHER_PORT, QUEUE = free_port(), free_port(), free_queues()


def in_netns(script: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "-n", "bash", "-c", "ip link set lo up\n" + script], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def one_line(p: subprocess.CompletedProcess, *words: str) -> str:
    """The failing command's stderr: exactly one line, `mimbox run: ...` with `words` in it."""
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith("mimbox run: ") and all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_not_root():
    p = in_netns(f"setpriv --reuid=65534 --regid=65534 --clear-groups {RUN} --listen 127.0.0.1:{PORT}")
    one_line(p, "needs root", "CAP_NET_ADMIN")


def test_port_in_use():
    p = in_netns(f"{PY} -c 'import socket;s=socket.socket();s.bind((\"127.0.0.1\",{PORT}));s.listen();"
                 "import signal;signal.pause()' & A=$!\n"
                 f"for i in $(seq 100); do ss -Hltn 'sport = :{PORT}' | grep -q . && break; sleep 0.1; done\n"
                 f"{RUN} --listen 127.0.0.1:{PORT}; rc=$?\nkill $A; wait; exit $rc")
    one_line(p, f"port {PORT}", "in use", "--listen")


def test_queue_in_use():
    p = in_netns(f"{RUN} --listen 127.0.0.1:{PORT} --queue-num {QUEUE} --syn-path hold --user root > /dev/null 2>&1 & A=$!\n"
                 f"for i in $(seq 100); do ss -Hltn 'sport = :{PORT}' | grep -q . && break; sleep 0.1; done\n"
                 f"{RUN} --listen 127.0.0.1:{OTHER_PORT} --queue-num {QUEUE} --syn-path hold; rc=$?\n"
                 "kill $A; wait; exit $rc")
    one_line(p, f"NFQUEUE {QUEUE}", "--queue-num")


def test_kernel_without_mptcp():
    p = in_netns(f"sysctl -qw net.mptcp.enabled=0\n{RUN} --listen 127.0.0.1:{PORT}")
    one_line(p, "MPTCP", "net.mptcp.enabled", "--no-client-mptcp")


def test_debug_keeps_the_traceback():
    p = in_netns(f"sysctl -qw net.mptcp.enabled=0\n{PY} -m mimbox.ops.cli --debug run --mode static "
                 f"--upstream 127.0.0.2:80 --workers 1 --listen 127.0.0.1:{PORT}")
    assert p.returncode != 0 and "Traceback" in p.stderr and "StartupError" in p.stderr, p.stderr[-2000:]
