"""`mimbox doctor`: every capability the converter uses, and (--testbed) what the experiments use,
probed for real (mimbox.host.kernel's probes), each with what was seen and how to fix it."""
from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass

from mimbox.host.kernel import (
    BPFFS,
    CGROUP2_ROOTS,
    QDISC_PROBE_ARGS,
    cgroup2_root,
    dual_stack_mptcp_works,
    mptcp_reuseport_works,
    mptcp_socket_works,
    read_text,
    run,
    sysctl,
    throwaway_netns,
    try_cmd,
)


@dataclass(frozen=True)
class Capability:
    """One probed feature: whether it works, what we saw, and how to fix it."""
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # experiments cannot run without it
    testbed: bool = False  # the testbed's (Mininet, link emulation, peers, tools), not the converter's

TESTBED = ("qdisc.", "link-emulation", "cgroup2", "cgroup.cpu-quota", "cpuidle.haltpoll", "mininet", "tool.",
           "nfqueue.bind")


def for_testbed(name: str) -> bool:
    """A capability only the testbed and experiments need (`mimbox doctor --testbed` shows them)."""
    return any(name == t or (t.endswith(".") and name.startswith(t)) for t in TESTBED)


def probe_all(build_dir: str | None = None, testbed: bool = True) -> list[Capability]:
    """Probe what the converter uses, and (testbed) what the experiments use."""
    import dataclasses
    caps = _probe_all(build_dir)
    caps = [dataclasses.replace(c, testbed=for_testbed(c.name)) for c in caps]
    return [c for c in caps if testbed or not c.testbed]


def _probe_all(build_dir: str | None = None) -> list[Capability]:
    caps: list[Capability] = []
    add = caps.append

    enabled = sysctl("net.mptcp.enabled")
    add(Capability("mptcp.enabled", enabled == "1", f"net.mptcp.enabled={enabled}",
                   "sysctl -w net.mptcp.enabled=1"))
    add(Capability("mptcp.socket", mptcp_socket_works(), "socket(AF_INET, SOCK_STREAM, IPPROTO_MPTCP)",
                   "a kernel built with CONFIG_MPTCP=y"))
    v6 = os.path.exists("/proc/net/if_inet6")
    add(Capability("ipv6", v6, "/proc/net/if_inet6" if v6 else "no IPv6 in this kernel",
                   "a kernel with CONFIG_IPV6; without it the converter serves IPv4 only", required=False))
    add(Capability("mptcp.socket6", mptcp_socket_works(socket.AF_INET6),
                   "socket(AF_INET6, SOCK_STREAM, IPPROTO_MPTCP): MPTCP clients and servers over IPv6",
                   "a kernel with CONFIG_MPTCP_IPV6=y", required=False))
    ok, out = dual_stack_mptcp_works()
    add(Capability("mptcp.dual-stack", ok, out, "net.ipv6.bindv6only=0 is not needed (the converter sets "
                   "IPV6_V6ONLY itself); without it listen on an IPv4 and an IPv6 address apart", required=False))
    ok, out = mptcp_reuseport_works()
    add(Capability("mptcp.reuseport", ok, out, "without it run the converter with --workers 1", required=False))
    with throwaway_netns() as ns:
        ok, out = try_cmd(["ip", "mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2"], ns)
        add(Capability("mptcp.limits", ok, f"ip mptcp limits set subflow 2: {out}",
                       "iproute2 with `ip mptcp` (Debian 12 has it)"))
        ok, out = try_cmd(["ip", "mptcp", "endpoint", "add", "10.99.0.1", "dev", "d0", "subflow"], ns)
        add(Capability("mptcp.endpoint", ok, f"ip mptcp endpoint add ... subflow: {out}", ""))
        for kind, req, fix in (("netem", False, "none here: topologies.links falls back to HTB + NFQUEUE delay line"),
                               ("htb", True, "CONFIG_NET_SCH_HTB"), ("tbf", False, "CONFIG_NET_SCH_TBF"),
                               ("fq", False, "not needed (no EDT pacing used)")):
            ok, out = try_cmd(["tc", "qdisc", "add", "dev", "d0", "root", "handle", "1:", kind,
                            *QDISC_PROBE_ARGS[kind]], ns)
            run(["tc", "qdisc", "del", "dev", "d0", "root"], netns=ns)
            add(Capability(f"qdisc.{kind}", ok, out, fix, required=req))
        # before the netfilter probes: their rules stay in this namespace (all TCP to a dead queue)
        ok, out = try_cmd([sys.executable, "-c", "from mimbox.converter.convert import probe; print(probe())"], ns)
        add(Capability("convert.tfo", ok, f"RFC 8803 mode's TCP Fast Open without cookie: {out}",
                       "a kernel with TCP Fast Open on MPTCP sockets (Linux >= 6.2); without it --mode convert "
                       "gets its message after the handshake, one round trip later", required=False))
        for name, rule, req in (
                ("netfilter.nfqueue", ["-t", "raw", "-A", "PREROUTING", "-p", "tcp", "-j", "NFQUEUE",
                                       "--queue-num", "7"], True),
                ("netfilter.tproxy", ["-t", "mangle", "-A", "PREROUTING", "-p", "tcp", "-j", "TPROXY",
                                      "--on-port", "1", "--tproxy-mark", "0x1/0x1"], True),
                ("netfilter.reject", ["-A", "INPUT", "-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
                 True)):
            ok, out = try_cmd(["iptables", *rule], ns)
            add(Capability(name, ok, out, "iptables (nft backend) with the xt target built in", required=req))
            ok, out = try_cmd(["ip6tables", *rule], ns)     # the same rule for IPv6 listeners ([::]:PORT)
            add(Capability(name + "6", ok, out, "ip6tables (nft backend) with the xt target built in; "
                           "without it listen on IPv4 only", required=False))
        ok, out = try_cmd(["ethtool", "-k", "d0"], ns)
        add(Capability("tool.ethtool", ok, out, "apt-get install ethtool"))
        ok, out = try_cmd([sys.executable, "-c", "from mimbox.host.synrecord import SynRecorder; "
                        "SynRecorder(65001, devices=['d0']).install().remove()"], ns)
        add(Capability("bpf.syn-recorder", ok, f"tc ingress BPF recording DST_OPT: {out or 'attached and removed'}",
                       "tc (iproute2), bpftool and `invoke build`; without it explicit mode reads every SYN "
                       "through NFQUEUE (--syn-path auto and accept cost more)", required=False))
        ok, out = try_cmd([sys.executable, "-c", "from mimbox.host.synack import SynAckOptions; "
                        "SynAckOptions().install().remove()"], ns)
        add(Capability("bpf.synack-options", ok, f"sockops reading servers' SYN-ACK options: {out or 'attached and removed'}",
                       "bpftool, cgroup2 and `invoke build`; without it convert mode's answers carry an empty "
                       "Extended TCP Header TLV", required=False))
    try:
        from netfilterqueue import NetfilterQueue
        q = NetfilterQueue()
        q.bind(65000, lambda p: p.accept())
        q.unbind()
        add(Capability("nfqueue.bind", True, "bound and unbound queue 65000 from Python"))
    except Exception as e:  # noqa: BLE001 - any failure here is the answer
        add(Capability("nfqueue.bind", False, repr(e), "pip install netfilterqueue; libnetfilter-queue1"))

    by = {c.name: c.ok for c in caps}
    emu_ok = by["qdisc.netem"] or (by["qdisc.htb"] and by["netfilter.nfqueue"] and by["nfqueue.bind"])
    add(Capability("link-emulation", emu_ok,
                   "netem" if by["qdisc.netem"] else "fallback: HTB rate + NFQUEUE delay line (topologies.links)",
                   "needs sch_netem, or sch_htb with NFQUEUE"))
    root = cgroup2_root()
    add(Capability("cgroup2", root is not None, f"writable cgroup2 at {root}",
                   "mount -t cgroup2 none /sys/fs/cgroup/unified"))
    bpffs = os.path.ismount(BPFFS)
    add(Capability("bpffs", bpffs, f"{BPFFS} mounted={bpffs}", f"mount -t bpf bpf {BPFFS}"))
    obj = os.path.join(build_dir or "build", "bpf", "dstopt_client.bpf.o")
    if os.path.exists(obj) and shutil.which("bpftool") and bpffs:
        pin = f"{BPFFS}/mimbox-probe-{os.getpid()}"
        ok, out = try_cmd(["bpftool", "prog", "loadall", obj, pin])
        shutil.rmtree(pin, ignore_errors=True)
        add(Capability("bpf.sock_ops+connect4", ok, f"bpftool prog loadall {obj}: {out}",
                       "kernel with BPF, BTF and bpf_store_hdr_opt (5.10+)"))
    else:
        add(Capability("bpf.sock_ops+connect4", False, f"{obj} not built", "invoke build"))

    quota = any(os.path.exists(p) for p in ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us",)) or any(
        "cpu" in read_text(f"{r}/cgroup.controllers").split() for r in CGROUP2_ROOTS)
    add(Capability("cgroup.cpu-quota", quota, "cgroup v2 cpu.max or v1 cpu.cfs_quota_us",
                   "the experiments' converter-bound regime needs a cgroup cpu controller", required=False))
    halt = "/sys/module/haltpoll/parameters/guest_halt_poll_ns"
    add(Capability("cpuidle.haltpoll", os.access(halt, os.W_OK), f"{halt} writable",
                   "Table 1's idle-polling rows are skipped without it (not a KVM guest with haltpoll)",
                   required=False))
    try:
        import mininet.net  # noqa: F401
        mn_ok = shutil.which("mnexec") is not None
        add(Capability("mininet", mn_ok, "mininet importable, mnexec on PATH" if mn_ok else "no mnexec",
                       "apt-get install mininet (Debian 2.3.0)"))
    except ImportError as e:
        add(Capability("mininet", False, str(e), "apt-get install mininet; venv with --system-site-packages"))
    for tool in ("bpftrace", "perf"):
        path = shutil.which(tool)
        add(Capability(f"tool.{tool}", path is not None, path or "not found",
                       f"apt-get install {'linux-perf' if tool == 'perf' else tool} (Table 1 breakdown, "
                       "per-connection cost split)", required=False))
    for tool in ("haproxy", "squid", "nginx", "wrk", "iperf3", "tcpdump", "clang", "bpftool", "ping"):
        path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
        add(Capability(f"tool.{tool}", path is not None, path or "not found",
                       f"apt-get install {'nginx-light' if tool == 'nginx' else 'iputils-ping' if tool == 'ping' else tool}"))
    shim = os.path.join(build_dir or "build", "libmptcpize.so")
    add(Capability("mptcpize.shim", os.path.exists(shim), shim, "invoke build"))
    try:
        from mimbox.converter.core import Core, lib
        from mimbox.converter.layouts import CoreConfig
        lib()
        probe = Core(CoreConfig(pipe_size=4096, pending_limit=1, recorder_fd=-1))
        r = probe.lib.core_queue(probe.ptr, 65002)      # the core binds its own NFQUEUE (libnetfilter_queue)
        probe.close()
        from mimbox.paths import RELAYCORE
        add(Capability("core", r == 0, f"{RELAYCORE} loaded, layouts match, NFQUEUE 65002 bound and "
                       f"released" if r == 0 else f"NFQUEUE bind from the core: errno {-r}", "invoke build (gcc, "
                       "libnetfilter-queue-dev)"))
    except (RuntimeError, OSError) as e:
        add(Capability("core", False, str(e), "invoke build (gcc, libnetfilter-queue-dev)"))
    return caps
