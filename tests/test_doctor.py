"""`mimbox doctor` reports this kernel as it is: each verdict is checked against an independent try."""
import json
import subprocess
import sys

from mimbox.host import kernel
from topologies.support import scratch_netns


def doctor() -> dict:
    p = subprocess.run([sys.executable, "-m", "mimbox.ops.cli", "doctor", "--json", "--testbed"], capture_output=True, text=True)
    return {c["name"]: c for c in json.loads(p.stdout)}, p.returncode


def independent_qdisc_try(kind: str) -> bool:
    """Not through mimbox.host.kernel: a namespace and veth pair of the test's own."""
    sh = lambda *a: subprocess.run(["ip", "netns", "exec", ns, *a], capture_output=True)  # noqa: E731
    with scratch_netns("mimbox-test") as ns:
        assert sh("ip", "link", "add", "t0", "type", "veth", "peer", "name", "t1").returncode == 0
        args = kernel.QDISC_PROBE_ARGS[kind]
        return sh("tc", "qdisc", "add", "dev", "t0", "root", kind, *args).returncode == 0


def independent_recorder_try() -> bool:
    """The converter-side BPF program loads and attaches at tc ingress (not through mimbox.host.kernel)."""
    import os
    import tempfile

    from mimbox.paths import BPF_SERVER_OBJ
    pin = tempfile.mktemp(prefix="mimbox-test-rec-", dir="/sys/fs/bpf")
    # nsenter, not `ip netns exec`: that remounts /sys, and the pin is in this mount namespace's bpffs
    sh = lambda *a: subprocess.run(["nsenter", f"--net=/run/netns/{ns}", *a], capture_output=True)  # noqa: E731
    with scratch_netns("mimbox-test") as ns:
        try:
            assert sh("ip", "link", "add", "t0", "type", "veth", "peer", "name", "t1").returncode == 0
            if subprocess.run(["bpftool", "prog", "load", str(BPF_SERVER_OBJ), pin, "type", "classifier"],
                              capture_output=True).returncode:
                return False
            return (sh("tc", "qdisc", "add", "dev", "t0", "clsact").returncode == 0 and
                    sh("tc", "filter", "add", "dev", "t0", "ingress", "bpf", "da", "object-pinned", pin).returncode == 0)
        finally:
            if os.path.exists(pin):
                os.unlink(pin)


def test_doctor_matches_reality():
    caps, rc = doctor()
    for kind in ("netem", "htb", "tbf"):
        assert caps[f"qdisc.{kind}"]["ok"] == independent_qdisc_try(kind), kind
    assert caps["mptcp.socket"]["ok"] == kernel.mptcp_socket_works()
    assert caps["qdisc.htb"]["ok"], "HTB is what the link emulation stands on"
    assert caps["tool.ethtool"]["ok"] and caps["mptcp.endpoint"]["ok"], caps
    assert caps["bpf.syn-recorder"]["ok"] == independent_recorder_try(), caps["bpf.syn-recorder"]
    with open("/proc/sys/net/mptcp/enabled") as f:
        assert caps["mptcp.enabled"]["ok"] == (f.read().strip() == "1")
    # exit status: non-zero exactly when a required capability is missing
    assert (rc == 0) == all(c["ok"] for c in caps.values() if c["required"])


def test_doctor_leaves_no_namespace():
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    doctor()
    after = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "mimbox-probe" not in after and before == after


def test_netem_missing_means_fallback_is_used():
    """On a kernel without netem the link class must take the fallback path (and say so)."""
    from topologies.links import netem_available
    assert netem_available() == independent_qdisc_try("netem")
