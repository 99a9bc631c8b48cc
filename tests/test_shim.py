"""The MPTCP shim (native/mptcpize.c) on loopback: which sockets it makes MPTCP, and that a listener
it swaps keeps what the program set on it."""
import json
import os
import subprocess
import sys

import pytest

from mimbox.paths import MPTCPIZE

IPPROTO_MPTCP = 262

PROGRAM = r"""
import json, os, socket
out = {}
L = socket.socket()
L.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
L.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
L.setblocking(False)
L.bind(("127.0.0.1", 0))
port = L.getsockname()[1]
L.listen(8)
out["listener"] = L.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
out["same_port"] = L.getsockname() == ("127.0.0.1", port)
out["reuseaddr"] = L.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
out["nodelay"] = L.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
out["nonblocking"] = not os.get_blocking(L.fileno())
out["cloexec"] = not os.get_inheritable(L.fileno())
c = socket.create_connection(("127.0.0.1", port), timeout=5)
out["outgoing"] = c.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
L.setblocking(True)
a, _ = L.accept()
c.sendall(b"ping")
out["echo"] = a.recv(4).decode()
U = socket.socket()          # never bound: listen() picks its port
U.listen(1)
out["unbound_listener"] = U.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
out["unbound_port"] = U.getsockname()[1]
X = socket.socket(socket.AF_UNIX)      # not TCP: listens as it is
X.bind("\0mimbox-shim-test-%d" % os.getpid())
X.listen(1)
out["unix_listens"] = X.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
print(json.dumps(out))
"""


def run_under_shim(program: str = PROGRAM, **env) -> dict:
    full = dict(os.environ, LD_PRELOAD=str(MPTCPIZE), **env)
    p = subprocess.run([sys.executable, "-c", program], env=full, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_listen_only_makes_listeners_mptcp_and_keeps_their_options(mptcp_ok):
    out = run_under_shim(MPTCPIZE_LISTEN_ONLY="1")
    assert out["listener"] == IPPROTO_MPTCP and out["unbound_listener"] == IPPROTO_MPTCP, out
    assert out["outgoing"] == 6, out                     # connections the program opens stay TCP
    assert out["same_port"] and out["unbound_port"] > 0, out
    assert out["reuseaddr"] and out["nodelay"] and out["nonblocking"] and out["cloexec"], out
    assert out["echo"] == "ping", out
    assert out["unix_listens"] == 1, out


def test_listen_only_holds_when_the_program_clears_its_environment(mptcp_ok):
    """nginx keeps only TZ in its environment once it starts: its connections to the server must stay
    TCP all the same (the shim reads its settings when it is loaded)."""
    out = run_under_shim("import os\nos.environ.clear()\n" + PROGRAM, MPTCPIZE_LISTEN_ONLY="1")
    assert out["listener"] == IPPROTO_MPTCP and out["outgoing"] == 6, out


def test_default_makes_every_socket_mptcp(mptcp_ok):
    out = run_under_shim()
    assert out["listener"] == IPPROTO_MPTCP and out["outgoing"] == IPPROTO_MPTCP, out
    assert out["echo"] == "ping", out


@pytest.mark.parametrize("value", ["0", ""])
def test_listen_only_off_values(mptcp_ok, value):
    assert run_under_shim(MPTCPIZE_LISTEN_ONLY=value)["outgoing"] == IPPROTO_MPTCP
