"""`invoke clean`: remove what a crashed run left behind, and only that.

Like `mn -c`, but narrower: `mn -c` also deletes every /tmp/*.log and /tmp/*.out on the machine and
every `*-ethN` link, whoever made them; this removes only our hosts' links, processes started
from our run directories, our rules, BPF pins, cgroups and temp files."""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

PATTERNS = ["topologies.delayline", "mimbox.ops.cli run", "experiments.measure", "mininet:"]
PEERS = ["nginx", "haproxy", "squid", "iperf3", "wrk", "tcpdump"]


HOSTS = ("client", "mbox", "server")   # topologies.testbed's node names
OURS = ("iperf3", "nginx", "haproxy", "squid", "wrk", "tcpdump", "mimbox", "experiments.", "topologies.", "mnexec")


def kill_orphans_in_namespaces() -> None:
    """Our tools still running in network namespaces other than the root one (a crashed testbed's)."""
    root = os.readlink("/proc/self/ns/net")   # run from the root namespace
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            ns = os.readlink(f"/proc/{pid}/ns/net")
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if ns != root and any(tag in cmd for tag in OURS):
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass                  # gone meanwhile


def remove_our_links() -> None:
    """veth ends our topologies' hosts left in the root namespace (named <host>-eth<N>)."""
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        if re.fullmatch(rf"({'|'.join(HOSTS)})-eth\d+", name):
            subprocess.run(["ip", "link", "del", name], capture_output=True)


def clean() -> None:
    for pat in PATTERNS:
        subprocess.run(["pkill", "-9", "-f", pat], capture_output=True)
    for peer in PEERS:   # only copies started from our run directories, never a system service
        subprocess.run(["pkill", "-9", "-f", f"{peer}.*mimbox-run"], capture_output=True)
    kill_orphans_in_namespaces()
    remove_our_links()
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name.startswith(("mimbox-", "nfttest")):
            subprocess.run(["ip", "netns", "del", name])
    for d in glob.glob("/tmp/mimbox-run-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in glob.glob("/sys/fs/bpf/mimbox-*"):
        shutil.rmtree(d, ignore_errors=True)
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        for d in glob.glob(f"{root}/mimbox-*"):
            try:
                os.rmdir(d)
            except OSError:
                pass                  # still has processes (EBUSY), or gone meanwhile
    for f in glob.glob("/tmp/mimbox-syn-*.py"):
        os.unlink(f)
    from topologies.regimes import cleanup_leftovers
    for line in cleanup_leftovers():
        print(f"clean: {line}")
    for chain_table in ("raw", "mangle", "filter"):
        out = subprocess.run(["iptables", "-t", chain_table, "-S"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("-A") and "MIMBOX-" in line:
                subprocess.run(["iptables", "-t", chain_table, *line.replace("-A", "-D", 1).split()])
        for line in out.splitlines():
            if line.startswith("-N MIMBOX-"):
                subprocess.run(["iptables", "-t", chain_table, "-F", line.split()[1]])
                subprocess.run(["iptables", "-t", chain_table, "-X", line.split()[1]])
    print("clean: done")


if __name__ == "__main__":
    clean()
