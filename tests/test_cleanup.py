"""`mimbox.sh clean` removes what this project left, and nothing of anybody else's."""
import os
import subprocess
import tempfile

from conftest import readline


def test_clean_keeps_other_files_and_links_and_removes_ours():
    other = tempfile.NamedTemporaryFile(dir="/tmp", suffix=".log", delete=False)
    other.close()
    ours = f"/tmp/mimbox-syn-{os.getpid()}.py"
    open(ours, "w").close()
    subprocess.run(["ip", "link", "add", "mbox-eth9", "type", "veth", "peer", "name", "mimbox-peer9"], check=True)
    subprocess.run(["ip", "link", "add", "user-eth9", "type", "veth", "peer", "name", "user-peer9"], check=True)
    try:
        from topologies.cleanup import clean
        clean()
        assert os.path.exists(other.name), "a file of somebody else's was deleted"
        assert not os.path.exists(ours)
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        assert "mbox-eth9" not in links          # our host's leftover veth end ...
        assert "user-eth9" in links              # ... but not a link named like Mininet's of another host
    finally:
        os.unlink(other.name)
        subprocess.run(["ip", "link", "del", "mbox-eth9"], capture_output=True)
        subprocess.run(["ip", "link", "del", "user-eth9"], capture_output=True)


def test_synack_reader_of_a_killed_converter_is_detached():
    """A converter killed with SIGKILL leaves its sockops program attached to its cgroup; the next
    start (mimbox.host.synack.remove_leftovers) detaches and unpins it."""
    import json
    import signal
    import subprocess
    import sys

    from mimbox.host import synack

    def attached() -> int:
        tree = subprocess.run(["bpftool", "-j", "cgroup", "tree"], capture_output=True, text=True).stdout
        return sum(p.get("name") == synack.PROG for g in json.loads(tree or "[]") for p in g.get("programs", []))
    before = attached()
    p = subprocess.Popen([sys.executable, "-c", "from mimbox.host.synack import SynAckOptions; import signal; "
                          "SynAckOptions().install(); print('up', flush=True); signal.pause()"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert readline(p, timeout=30).strip() == "up"   # then it waits to be killed
        assert attached() == before + 1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
    assert attached() == before + 1                 # killed: still attached
    removed = synack.remove_leftovers()
    assert len(removed) == 1 and attached() == before, removed


def test_syn_recorder_of_a_killed_converter_leaves_nothing_behind():
    """An explicit-mode converter killed with SIGKILL leaves its recorder's filter, the clsact qdisc
    it added and its pins; the next recorder's start removes the pins of every recorder whose
    process is gone (any port), and a clean-up (port None) the filter and the qdisc."""
    import signal
    import sys

    from topologies.support import free_port, scratch_netns
    port = free_port()
    with scratch_netns("mimbox-rec") as ns:
        run = ["nsenter", f"--net=/run/netns/{ns}", sys.executable, "-c"]   # this mount namespace: its bpffs
        p = subprocess.Popen([*run, f"from mimbox.host.synrecord import SynRecorder; import signal; "
                              f"SynRecorder({port}, devices=['lo']).install(); print('up', flush=True); signal.pause()"],
                             stdout=subprocess.PIPE, text=True)
        try:
            assert readline(p, timeout=30).strip() == "up"
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=10)
        pins = [d for d in os.listdir("/sys/fs/bpf") if d.startswith(f"mimbox-syn-{port}-")]
        assert pins, "the killed recorder's pins are not there to be found"
        assert "clsact" in subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", "lo"],
                                          capture_output=True, text=True).stdout
        out = subprocess.run([*run, "from mimbox.host.synrecord import remove_leftovers; "
                              "print('\\n'.join(remove_leftovers(None, ['lo'])))"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        assert f"pins /sys/fs/bpf/{pins[0]}" in out and f"pref {port}" in out and "clsact" in out, out
        assert not any(d.startswith(f"mimbox-syn-{port}-") for d in os.listdir("/sys/fs/bpf"))
        assert "clsact" not in subprocess.run(["tc", "-n", ns, "qdisc", "show", "dev", "lo"],
                                              capture_output=True, text=True).stdout
        assert not [d for d in os.listdir("/sys/fs/bpf") if d.startswith("mimbox-clsact-") and d.endswith("-lo")
                    and os.path.isdir(f"/sys/fs/bpf/{d}") and d.split("-")[2] == str(
                        os.stat(f"/run/netns/{ns}").st_ino)]
