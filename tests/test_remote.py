"""The remote harness for real: the paper's three hosts as namespaces each running Debian's sshd
(topologies/sshrig.py), driven over SSH by Fabric exactly as a lab's machines would be. Fig. 5's and
Table 1's tiny points run there through `compare --hosts` (docs/remote.md's commands), the results
have the local run's form, and every host is left as it was -- after a run, and after Ctrl-C.
A host that refuses SSH, has no MPTCP or has a port taken stops everything before it starts."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import require

from topologies.sshrig import SSHD, SSHRig

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
ROLES = ("client", "converter", "server")
SYSCTLS = ("net.ipv4.ip_forward", "net.ipv4.tcp_tw_reuse", "net.ipv4.ip_local_port_range",
           "net.ipv4.ip_local_reserved_ports")


@pytest.fixture(scope="module")
def rig():
    require(os.path.exists(SSHD), f"{SSHD} (openssh-server) is not installed")
    with SSHRig() as r:
        r.hosts_file = r.write_hosts_file()
        r.before = state(r)
        yield r


def docs_command(figure: str) -> list[str]:
    """docs/remote.md's `compare --figure FIGURE ... --hosts lab.toml` line, as argv after ./mimbox.sh."""
    text = (ROOT / "docs" / "remote.md").read_text()
    line = next(x.strip() for x in text.splitlines() if x.strip().startswith(f"./mimbox.sh compare --figure {figure} "))
    return shlex.split(line)[1:]


def compare(rig, argv: list[str], out: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`./mimbox.sh compare ...` as written in the docs (invoke's arguments are experiments.compare's),
    the rig's hosts file for lab.toml, into `out`."""
    args = [rig.hosts_file if a == "lab.toml" else a for a in argv[1:]] + ["--out", str(out)]
    return subprocess.run([PY, "-m", "experiments.compare", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def state(rig) -> dict:
    """What the harness may change on each host, as the hosts see it."""
    out = {}
    for role in ROLES:
        out[role] = {
            "sysctl": rig.exec(role, "sysctl -n " + " ".join(SYSCTLS)),
            "rules": rig.exec(role, "ip rule show"),
            "routes": rig.exec(role, "ip route show table all | grep -v -e '^local' -e '^multicast' -e 'fe80::' "
                                     "-e '^ff00::' | sort"),
            "endpoints": rig.exec(role, "ip mptcp endpoint show"),
            "limits": rig.exec(role, "ip mptcp limits show"),
            "qdiscs": rig.exec(role, "tc qdisc show | grep -v -e noqueue -e 'pfifo_fast' | sort"),
            "addresses": rig.exec(role, "ip -o addr show | awk '{print $2, $4}' | sort"),
        }
    return out


def leftovers(rig) -> list[str]:
    """Anything of a run still on a host: processes besides sshd, cgroups, rules, pins, run files."""
    found = []
    for role in ROLES:
        sshd = {rig.sshd[role].pid}
        for pid in rig.namespace_pids(role):
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue                  # gone meanwhile
            if pid not in sshd and "sshd" not in cmd:
                found.append(f"{role}: process {pid} {cmd[:120]}")
        for what, cmd in (("cgroup", "ls /sys/fs/cgroup/cpu /sys/fs/cgroup/cpuacct | grep mimbox-quota-r"),
                          ("iptables rule", "iptables-save | grep -i mimbox"),
                          ("nft table", "nft list tables | grep -i mimbox"),
                          ("BPF pin", "ls /sys/fs/bpf | grep -i mimbox"),
                          ("run files", f"ls {rig.workdir}/run 2>/dev/null")):
            text = rig.exec(role, cmd).strip()
            if text:
                found.append(f"{role}: {what}: {text[:200]}")
    return found


def assert_left_as_it_was(rig) -> None:
    assert leftovers(rig) == []
    now = state(rig)
    for role in ROLES:
        for key, before in rig.before[role].items():
            assert now[role][key] == before, f"{role} {key}: {before!r} -> {now[role][key]!r}"


def test_fig5_tiny_point_over_ssh(rig, tmp_path):
    r = compare(rig, docs_command("fig5"), tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # preflight: one table per host, then the install
    for role in ROLES:
        assert re.search(rf"^{role} \(root@172\.30\.\d+\.2:22\)$", r.stdout, re.M)
    assert "MPTCP enabled                OK" in r.stdout
    run = tmp_path / "out" / "fig5_workload"
    df = pd.read_csv(run / "data.csv")
    local = pd.read_csv(ROOT / "results" / "fig5_workload" / "data.csv", nrows=1)
    assert list(df.columns) == list(local.columns)          # the same form as a local run
    assert set(df.system) == {"router", "mimbox-static", "haproxy-1t-tcp"} and set(df["size"]) == {1024}
    assert (df.req_per_s > 0).all() and (df.socket_errors == 0).all()
    conv = df[df.system != "router"]
    assert (conv.mptcp_syns_from_clients > 0).all()
    # TCP towards the server: at most MiMBox's one probe whether the server speaks MPTCP
    assert (conv.groupby("system").mptcp_syns_to_servers.sum() <= 1).all()
    assert (conv.cpu_us_per_req > 0).all()                  # read from the converter host's cgroup
    man = json.loads((run / "manifest.json").read_text())
    remote = man["remote"]
    assert remote["hosts_file"] == rig.hosts_file and set(remote["hosts"]) == set(ROLES)
    assert set(remote["cpu_steal_share"]) == set(ROLES)
    conv_host = remote["hosts"]["converter"]
    assert conv_host["pinned_to"] == "1" and set(conv_host["interfaces"]) == {"eth1", "eth2", "eth3"}
    assert conv_host["interfaces"]["eth1"]["driver"] == "veth" and conv_host["interfaces"]["eth1"]["mtu"] == "1500"
    assert "HAProxy" in conv_host["versions"]["haproxy"]
    assert man["regimes"]["converter-bound"]["quota_us"]["mimbox-static"] == 25_000   # --quota 0.25
    assert len(man["link_fidelity"]) == 3 and all(x["rtt_ms"] > 0 for x in man["link_fidelity"])
    assert_left_as_it_was(rig)


def test_table1_tiny_run_over_ssh(rig, tmp_path):
    r = compare(rig, docs_command("table1"), tmp_path / "out")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "installed the wheel" not in r.stdout               # the hosts kept the set installed before
    df = pd.read_csv(tmp_path / "out" / "table1_delay" / "data.csv")
    local = pd.read_csv(ROOT / "results" / "table1_delay" / "data.csv", nrows=1)
    assert set(local.columns) <= set(df.columns)
    assert set(df.idle) == {"halt"}
    counts = df.groupby(["system", "segment"]).size().to_dict()
    for system in ("router", "mimbox (TCP server)"):     # the captures came back from the converter host
        assert counts[(system, "SYN")] >= 90 and counts[(system, "data")] >= 90
    assert counts[("mimbox (TCP server)", "SYN+ACK")] >= 90
    assert (df.delay_us > 0).all()
    assert_left_as_it_was(rig)


def test_concurrency_tiny_points_over_ssh(rig, tmp_path):
    """The concurrency figure's crowd on the client host, its echo server on the server host, the
    converter measured on its own host (kernel caches, RSS, fds, run-queue wait, all read there);
    the source addresses it adds are gone afterwards (assert_left_as_it_was). (The converter-bound
    regime's CPU boxes on a remote host: test_fig5_tiny_point_over_ssh.)"""
    code = ("import sys; from experiments import common, concurrency\n"
            "with common.remote_lab(sys.argv[1]):\n"
            "    concurrency.main(quick=True, counts=[40], bound_counts=[], interval=1.0, idle_seconds=0.5,"
            " new_seconds=1.0, new_only_rate=20.0, only=['mimbox-1w'])")
    r = subprocess.run([PY, "-c", code, rig.hosts_file], capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "MIMBOX_RESULTS": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "concurrency"
    df = pd.read_csv(run / "data.csv")
    assert set(zip(df.regime, df.system, df.connections)) == {
        ("end-host-bound", "router", 40), ("end-host-bound", "mimbox-1w", 40)}
    assert (df.opened == df.connections).all() and (df.open_failed == 0).all() and (df.errors == 0).all()
    assert (df.keepalives == df.connections).all() and (df.new_requests > 0).all()
    conv = df[df.system == "mimbox-1w"]
    # read on the converter host: its processes' fds (two a connection) and memory, its box's CPU
    assert (conv.fds_per_conn >= 1.5).all() and (conv.rss_kb_per_conn >= 0).all(), conv.to_string()
    assert (conv.cpu_us_per_new > 0).all() and conv.converter_runq_wait_ms_per_s.notna().all()
    assert df.end_hosts_runq_wait_ms_per_s.notna().all()
    man = json.loads((run / "manifest.json").read_text())
    assert man["remote"]["hosts_file"] == rig.hosts_file and set(man["remote"]["hosts"]) == set(ROLES)
    # the converter host's own open-file hard limit sets the capacities (the rig's: this machine's)
    assert man["fd_hard_limit"] == int(rig.exec("converter", "sh -c 'ulimit -Hn'").strip())
    assert man["converter_cpus"] == "1"
    assert_left_as_it_was(rig)


def test_ctrl_c_leaves_every_host_as_it_was(rig, tmp_path):
    args = [rig.hosts_file if a == "lab.toml" else a for a in docs_command("fig5")[1:]]
    p = subprocess.Popen([PY, "-m", "experiments.compare", *args, "--out", str(tmp_path / "out")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen = []
    try:
        deadline = time.monotonic() + 120
        for line in p.stdout:                       # converters running, in their boxes, on the hosts
            seen.append(line)
            if "fig5 converter-bound rep 0" in line or time.monotonic() > deadline:
                break
        assert any("fig5 converter-bound rep 0" in x for x in seen), "".join(seen)[-2000:]
        assert any("mimbox" in rig.exec("converter", f"cat /proc/{pid}/cmdline 2>/dev/null")
                   for pid in rig.namespace_pids("converter"))
        p.send_signal(signal.SIGINT)
        p.wait(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
    assert p.returncode != 0
    assert_left_as_it_was(rig)


@pytest.mark.parametrize("fault, cause", [
    (dict(refuse_ssh=("server",)), r"server \(root@172\.30\.\d+\.2:22\): SSH refused: AuthenticationException"),
    (dict(without_mptcp=("converter",)), r"converter \(root@172\.30\.\d+\.2:22\): MPTCP enabled: net\.mptcp\.enabled = 0"),
    ("port", r"server \(root@172\.30\.\d+\.2:22\): ports 80-9500: taken: 80"),
])
def test_a_host_that_cannot_take_part_stops_everything(fault, cause, tmp_path):
    require(os.path.exists(SSHD), f"{SSHD} (openssh-server) is not installed")
    with SSHRig(**(fault if isinstance(fault, dict) else {})) as bad:
        listener = None
        if fault == "port":
            listener = subprocess.Popen(["nsenter", "-t", str(bad.sshd["server"].pid), "-n", PY, "-c",
                                         "import socket, time; s = socket.create_server(('0.0.0.0', 80)); "
                                         "print('ready', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
            assert listener.stdout.readline().strip() == "ready"
        try:
            t0 = time.monotonic()
            r = subprocess.run([PY, "-m", "experiments.compare", *docs_command("fig5")[1:-1], bad.write_hosts_file(),
                                "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT)
            assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
            assert re.search(cause, r.stderr), r.stderr[-2000:]
            assert time.monotonic() - t0 < 60
            assert "installed the wheel" not in r.stdout       # nothing was started anywhere
            for role in ROLES:
                assert not bad.exec(role, f"ls {bad.workdir}").strip()
                assert "table 70" not in bad.exec(role, "ip rule show")
        finally:
            if listener is not None:
                listener.kill()
                listener.wait(timeout=10)


def test_reproduce_hosts_refuses_what_runs_here_only(rig, tmp_path):
    r = subprocess.run([PY, "-m", "experiments.reproduce", "--hosts", rig.hosts_file, "--only", "scaleout"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "scaleout run on this machine only" in r.stderr
    # a shaped figure on hosts whose kernel has no sch_netem (this machine's): refused, named, undone
    r = subprocess.run([PY, "-m", "experiments.reproduce", "--quick", "--hosts", rig.hosts_file, "--only", "fig6"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "MIMBOX_RESULTS": str(tmp_path)})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert re.search(r"fig6: refused: \w+ \(root@172\.30\.\d+\.2:22\): cannot emulate delay or loss.*sch_netem",
                     r.stdout), r.stdout[-2000:]
    assert_left_as_it_was(rig)
    r = subprocess.run([PY, "-m", "experiments.reproduce", "--hosts", "/nonexistent/lab.toml", "--only", "fig5"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2 and "/nonexistent/lab.toml:?: cannot read" in r.stderr


@pytest.mark.slow
def test_readme_reproduce_hosts_runs_as_written(rig, tmp_path):
    """README's `./mimbox.sh reproduce --quick --hosts lab.toml`, the rig's hosts file for lab.toml,
    results into a directory of the test's (Figs. 5, 6, Table 1, the interactive and concurrency
    figures: about half an hour, behind --slow)."""
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "reproduce --quick --hosts" in x)
    argv = shlex.split(line.split("#")[0])
    argv = [rig.hosts_file if a == "lab.toml" else a for a in argv]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=3600, cwd=ROOT,
                       env={**os.environ, "MIMBOX_RESULTS": str(tmp_path)})
    # this machine's kernel has no sch_netem: the shaped figures are refused by name, the others run
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"FAILED: \['fig6', 'interactive'\]", r.stdout) and r.stdout.count("(its kernel needs sch_netem)") == 2
    for name in ("fig5_workload", "table1_delay", "concurrency"):
        man = json.loads((tmp_path / "remote" / name / "manifest.json").read_text())
        assert man["remote"]["hosts_file"] == rig.hosts_file
    assert_left_as_it_was(rig)


def test_shaped_paths_on_the_hosts_own_interfaces(rig):
    """A figure's shaping goes onto the hosts' interfaces (HTB for the rate) and is gone afterwards;
    delay needs sch_netem, which this machine's kernel lacks: refused with the host and the reason,
    and what was set up before the refusal undone."""
    import io

    from topologies.hostsfile import load
    from topologies.lab import LabRefused, RemoteLab
    from topologies.remotebed import RemoteTestbed
    from topologies.testbed import MobileTopo, PaperTopo, PathSpec

    class RateOnly(PaperTopo):
        def build(self):
            super(PaperTopo, self).build([PathSpec("a", up=dict(bw=5, max_queue_size=50)), PathSpec("b")],
                                         [PathSpec("s")], False)

    lab = RemoteLab(load(rig.hosts_file)).open(out=io.StringIO())
    try:
        with RemoteTestbed(lab, RateOnly()) as tb:
            shown = tb.client.cmd("tc qdisc show dev eth1; tc class show dev eth1")
            assert "qdisc htb 1: root" in shown and "rate 5Mbit" in shown and "pfifo 10: parent 1:1 limit 50p" in shown
            assert "htb" not in tb.mbox.cmd("tc qdisc show")       # the other direction is not shaped
        with pytest.raises(LabRefused, match=r"(client|converter|server) \(root@172\.30\.\d+\.2:22\): cannot "
                                             r"emulate delay or loss.*sch_netem"):
            RemoteTestbed(lab, MobileTopo(ipv6=False)).start()
    finally:
        lab.close()
    assert_left_as_it_was(rig)
