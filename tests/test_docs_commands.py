"""Every `mimbox run` line README.md and docs/running.md show runs as written and relays bytes
(issue 36 finding 6: the README's own static command reset every client). The paper's testbed is
given the addresses the examples use: the server also holds 192.0.2.1, 2001:db8::1 and
2001:db8:5::1 (an HTTP server on ports 80 and 443 of every address), the converter also 192.0.2.2,
2001:db8::2 and 2001:db8:1::2 facing the client, the client 2001:db8:1::1. Each run line starts
alone; the `mimbox client` line that follows it in its block (if any) is run as written on the
client, else the mode's own client: curl through the listener (static), `mimbox client`
(explicit, convert), curl on the path (transparent). What comes back must be the server's page."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

import pytest
from topologies.support import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/running.md")
TOKEN = "mimbox-docs-page"
BIN = os.path.dirname(sys.executable)       # where `mimbox` is (the venv), for the namespaces' shells


def shown() -> list[tuple[str, str, str | None, str | None]]:
    """(where, run line, the client line that follows it in its block or None, the block's `mimbox
    stats` line if this is the block's last converter, else None), as written."""
    out = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        for block in re.findall(r"```(?:sh|bash)?\n(.*?)```", text, re.S):
            lines = block.splitlines()
            for i, line in enumerate(lines):
                if not line.startswith("mimbox run"):
                    continue
                nxt = next((x for x in lines[i + 1:] if x.startswith(("mimbox run", "mimbox client"))), None)
                out.append((f"{doc}: {line.split('#')[0].strip()}", line,
                            nxt if nxt and nxt.startswith("mimbox client") else None))
            stats = [x for x in lines if x.startswith("mimbox stats")]
            if stats and out and out[-1][1] in lines:     # the block's stats line, against its last converter
                where, line, client = out[-1]
                out[-1] = (where, line, client, stats[0])
    return [o if len(o) == 4 else (*o, None) for o in out]


def argv_of(line: str) -> list[str]:
    """The words of a shown line: its comment dropped, an optional `[--flag ARG]` left out."""
    words, out, optional = shlex.split(line, comments=True), [], False
    for w in words:
        if w.startswith("[--"):
            optional = True
        if not optional:
            out.append(w)
        if optional and w.endswith("]"):
            optional = False
    return out


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def own_client(argv: list[str]) -> list[str]:
    """The mode's own client commands when the docs show none after the run line."""
    mode, listen = option(argv, "--mode"), option(argv, "--listen") or "0.0.0.0:7000"
    allowed = option(argv, "--allow-destination") or ""
    port = listen.rsplit(":", 1)[1]
    v6 = "2001:db8" in allowed
    url = "http://[2001:db8:5::1]" + (":443" if "]:443" in allowed else "") + "/" if v6 else "http://10.0.101.1/"
    if mode == "static":
        via = {"0.0.0.0": ["10.0.1.2"], "[::]": ["10.0.1.2", "[fd00:0:1::2]"]}.get(listen.rsplit(":", 1)[0],
                                                                                  [listen.rsplit(":", 1)[0]])
        return [f"curl -sf -m 10 http://{v}:{port}/" for v in via]
    if mode in ("explicit", "convert"):
        vias = f"--via 10.0.1.2:{port} --via '[2001:db8::2]:{port}'"
        return [f"mimbox client {'--convert ' if mode == 'convert' else ''}{vias} --mptcp -- curl -sf -m 10 {url}"]
    return [f"curl -sf -m 10 {url}"]                 # transparent: on the path


ADDRESSES = """
server: ip addr add 192.0.2.1/32 dev {srv}; ip addr add 2001:db8::1/128 dev {srv} nodad; ip addr add 2001:db8:5::1/64 dev {srv} nodad
mbox: ip addr add 192.0.2.2/32 dev {mcl}; ip addr add 2001:db8::2/128 dev {mcl} nodad; ip addr add 2001:db8:1::2/64 dev {mcl} nodad
mbox: ip route add 192.0.2.1/32 via 10.0.101.1; ip -6 route add 2001:db8::1/128 via fd00:0:101::1; ip -6 route add 2001:db8:5::/64 via fd00:0:101::1
client: ip addr add 2001:db8:1::1/64 dev {cl} nodad
"""


@pytest.fixture(scope="module")
def docs_tb(paper_tb, tmp_path_factory):
    tb = paper_tb
    names = dict(srv=tb.topo.server_addrs[0].intf_outer, mcl=tb.topo.client_addrs[0].intf_mbox,
                 cl=tb.topo.client_addrs[0].intf_outer)
    hosts = {"server": tb.server, "mbox": tb.mbox, "client": tb.client}
    undo = []
    for line in ADDRESSES.strip().splitlines():
        who, cmds = line.split(": ", 1)
        for cmd in cmds.format(**names).split("; "):
            out = hosts[who].cmd(cmd + " && echo ok")
            assert out.strip().endswith("ok"), (cmd, out)
            undo.append((hosts[who], cmd.replace(" add ", " del ", 1).replace(" nodad", "")))
    www = tmp_path_factory.mktemp("www")
    (www / "index.html").write_text(TOKEN + "\n")
    servers = [tb.server.popen([sys.executable, "-m", "http.server", str(port), "--bind", "::", "--directory", str(www)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for port in (80, 443)]
    try:
        wait_until(lambda: all(f":{p} " in tb.server.cmd(f"ss -Htln sport = :{p}") for p in (80, 443)), 10,
                   "the docs' HTTP servers listening")
        yield tb
    finally:
        for p in servers:
            p.kill()
            p.wait(timeout=10)
        for host, cmd in reversed(undo):
            host.cmd(cmd)


def sh(host, line: str, timeout: float = 30) -> tuple[int, str]:
    p = host.popen(["sh", "-c", f"PATH={BIN}:$PATH; {line}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                   text=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        return -1, out
    return p.returncode, out


@pytest.mark.parametrize("where,line,client,stats", shown(), ids=[w for w, *_ in shown()])
def test_a_shown_command_relays_as_written(docs_tb, tmp_path, where, line, client, stats):
    tb = docs_tb
    argv = argv_of(line)
    if any(w.startswith("/") or w == "PATH" for w in argv[2:]):
        pytest.fail(f"{where}: names a path the test cannot make")
    ipv6_dstopt = client is not None and "[2001:db8" in client and option(argv, "--mode") == "explicit"
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        # (mnexec -d: a session of its own, so the signal below reaches its whole group)
        run = tb.mbox.popen(["sh", "-c", f"PATH={BIN}:$PATH; exec {shlex.join(argv)}"], stdout=f,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "mimbox ready" in log.read_text() or run.poll() is not None, 30, f"{where}: ready")
        assert "mimbox ready" in log.read_text(), log.read_text()[-2000:]
        if ipv6_dstopt:          # what the example's comment asks of the client (the option's room)
            tb.client.cmd("sysctl -qw net.ipv4.tcp_timestamps=0")
        for cmd in [shlex.join(argv_of(client))] if client else own_client(argv):
            code, out = sh(tb.client, cmd)
            assert code == 0 and TOKEN in out, f"{where}\n  client: {cmd}\n  -> {code} {out[-1500:]}"
        if stats:                 # the block's `mimbox stats` line, as written, on the converter's host
            code, out = sh(tb.mbox, shlex.join(argv_of(stats)))
            assert code == 0 and "accepted" in out, f"{stats} -> {code} {out[-1500:]}"
        if option(argv, "--health-port"):
            code, out = sh(tb.client, f"{sys.executable} -c \"import socket;socket.create_connection(('10.0.1.2',"
                                      f"{option(argv, '--health-port')}),5).close();print('health ok')\"")
            assert "health ok" in out, out
    finally:
        if ipv6_dstopt:
            tb.client.cmd("sysctl -qw net.ipv4.tcp_timestamps=1")
        os.kill(run.pid, signal.SIGTERM)            # as a service manager stops it (the supervisor)
        try:
            run.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(timeout=10)
    rest = log.read_text()
    assert run.returncode == 0 and "every connection will be refused" not in rest, rest[-1500:]


def set_up_lines() -> list[tuple[str, str, str]]:
    """The other command lines of docs/running.md's blocks (the path manager, the ECMP recipe), as
    written, with the host they run on: (where, host, line). Comment-only and continuation lines
    are skipped; `mimbox run` lines are the test above's."""
    with open(os.path.join(ROOT, "docs/running.md")) as f:
        text = f.read()
    out = []
    for block in re.findall(r"```(?:sh|bash)?\n(.*?)```", text, re.S):
        host = "converter"
        for line in block.splitlines():
            if line.startswith("# on the front router"):
                host = "router"
            word = line.split(" ", 1)[0]
            if word in ("ip", "sysctl") or line.startswith("mimbox pm"):
                out.append((f"docs/running.md ({host}): {line.split('#')[0].strip()}", host, line))
    return out


# what each host of the recipe has before its lines run (an interface towards the others)
HOSTS = {"converter": "ip link add eth1 type veth peer name p1 && ip addr add 192.0.2.11/24 dev eth1",
         "router": "ip link add eth1 type veth peer name p1 && ip addr add 192.0.2.1/24 dev eth1"}
EFFECT = {"converter": ("ip mptcp endpoint show; ip mptcp limits show; ip -o addr show dev lo; "
                        "sysctl -n net.mptcp.allow_join_initial_addr_port"),
          "router": "ip nexthop show; ip route show 198.51.100.1; sysctl -n net.ipv4.fib_multipath_hash_policy"}


@pytest.mark.parametrize("host", ["converter", "router"])
def test_the_recipes_set_up_lines_run_as_written(host):
    """docs/running.md's path-manager and ECMP lines, as written, each in a network namespace of its
    own for the host it names, one after the other: each exits 0 and leaves what it says."""
    lines = [line for _, h, line in set_up_lines() if h == host]
    assert lines, "the docs show no such line any more"
    script = " && ".join([f"export PATH={BIN}:$PATH", "ip link set lo up", HOSTS[host],
                          "ip link set eth1 up && ip link set p1 up",
                          *(f"{{ {line.split('#')[0].strip()} ; }}" for line in lines), EFFECT[host]])
    p = subprocess.run(["unshare", "--net", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, (lines, p.stdout, p.stderr)
    out = p.stdout
    if host == "converter":
        assert "192.0.2.10" in out and "192.0.2.11" in out and "subflows 2" in out, out
        assert "198.51.100.1" in out and out.strip().endswith("0"), out
    else:
        assert "group 1/2 type resilient" in out and "nhid 100" in out and out.strip().endswith("1"), out
