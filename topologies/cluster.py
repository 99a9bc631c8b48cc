"""Several converters behind one service address: the stateless ECMP front tier operators use.

    client =(wifi, 3g)= front ==(ECMP to the VIP)== conv1 .. convN
                          \\________________________ server

`front` is a router. The service address (VIP) sits on every converter's loopback, and `front`
reaches it through a resilient nexthop group over the N converters with L4 hashing
(`fib_multipath_hash_policy=1`): each connection's first subflow lands on one converter, and
removing a converter moves none of the others' flows (only its hash buckets are given to the
survivors). The converters are one-armed: they reach the server through `front` too.

MPTCP joins must reach the converter that owns the connection, which the VIP's hash does not
promise. `Cluster.configure_pm()` does what RFC 8684 §3.1 prescribes for a load-balanced server:
the C flag (`net.mptcp.allow_join_initial_addr_port=0`: "do not join my initial address") and a
`signal` endpoint with the converter's own address (ADD_ADDR), so the phone's second subflow
goes straight to its converter's unique address. The phone accepts announced addresses and
opens the join from its 3G address (a `subflow fullmesh` endpoint: fullmesh endpoints are used
towards announced addresses too).

    with ClusterTestbed(ClusterTopo(n=3)) as tb:
        tb.converter(0).cmd("mimbox pm --cluster", tb.instance_ip(0))
        print(tb.front.cmd("ip route get", tb.VIP))
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from mininet.topo import Topo

from topologies.testbed import HOST_SYSCTLS, Addr, Testbed

VIP = "10.255.0.1"
VIP6 = "fd00:255::1"                             # the service address's IPv6 twin (dual-stack topologies)
GROUP = 1000                                     # the VIP's nexthop group
GROUP6 = 1006                                    # VIP6's (IPv6 routes take IPv6 nexthops only)
RESILIENT = "type resilient buckets 128 idle_timer 0"   # kept on every rewrite of the group (health check too);
# idle_timer 0: a member added to the group gets its share of buckets at once, not after 120 s idle


class ClusterTopo(Topo):
    """A two-path client, a front router, `n` converter hosts and a server (unshaped veth links)."""

    def build(self, n: int = 3, client_bw: float | None = None, ipv6: bool = True):
        """Hosts `client`, `front`, `conv1`..`convN`, `server`; one link per client path and per host.
        Each link is a testbed `Addr` whose middle end (.2, `mbox_ip`) is the front router.
        client_bw (Mbit/s, each direction of each client path) makes transfers last, e.g. to fail
        a converter in their middle. ipv6: every link dual-stack (Addr's fd00:0:<n>::/64), VIP6
        beside the VIP; False: IPv4 only."""
        if not 1 <= n <= 50:
            raise ValueError(f"a cluster has 1..50 converters, not {n}")
        self.n, self.ipv6 = n, ipv6
        client, front, server = (self.addHost(h, ip=None) for h in ("client", "front", "server"))
        port = 0
        self.client_addrs = []
        shape = {"bw": client_bw} if client_bw else {}
        for i in range(2):
            a = Addr(1 + i, f"client-eth{i}", f"front-eth{port}")
            self.client_addrs.append(a)
            self.addLink(client, front, intfName1=a.intf_outer, intfName2=a.intf_mbox,
                         params1={"ip": a.outer_ip + "/24", **shape}, params2={"ip": a.mbox_ip + "/24", **shape})
            port += 1
        self.server_addr = Addr(101, "server-eth0", f"front-eth{port}")
        self.addLink(server, front, intfName1=self.server_addr.intf_outer, intfName2=self.server_addr.intf_mbox,
                     params1={"ip": self.server_addr.outer_ip + "/24"}, params2={"ip": self.server_addr.mbox_ip + "/24"})
        port += 1
        self.instance_addrs = []
        for k in range(n):
            s = Addr(201 + k, f"conv{k + 1}-eth0", f"front-eth{port}")
            self.instance_addrs.append(s)
            conv = self.addHost(f"conv{k + 1}", ip=None)
            self.addLink(conv, front, intfName1=s.intf_outer, intfName2=s.intf_mbox,
                         params1={"ip": s.outer_ip + "/24"}, params2={"ip": s.mbox_ip + "/24"})
            port += 1


class InstanceView:
    """One converter of the cluster seen through the names a single-box Testbed has (`client`,
    `mbox`, `server`, `server_ip`, `mbox_client_ip`), so the experiments' systems start on it
    unchanged; clients reach it at the VIP."""

    def __init__(self, tb: "ClusterTestbed", k: int, family: int = 4):
        """family: 6 gives the IPv6 names (VIP6, the server's IPv6 address)."""
        self.tb, self.k, self.client_family = tb, k, family
        self.server_family = family
        self.client, self.server, self.mbox = tb.client, tb.server, tb.converter(k)
        self.server_ip = tb.topo.server_addr.outer(family)
        self.mbox_client_ip = VIP6 if family == 6 else VIP
        self.client_ips = [a.outer(family) for a in tb.topo.client_addrs]


class ClusterTestbed(Testbed):
    """A started ClusterTopo with routing, ECMP and MPTCP configured; tears everything down on exit.

    cluster_pm=False leaves the converters' path managers at the kernel's defaults (joins to the
    VIP allowed, nothing announced): the negative control, where joins hash to the wrong box."""
    __test__ = False
    VIP = VIP

    def __init__(self, topo: ClusterTopo, cluster_pm: bool = True, resilient: bool = True):
        super().__init__(topo)
        self.cluster_pm = cluster_pm
        self.resilient = resilient
        self.nexthop_ids: list[int] = []
        self.checker = None

    # -- names -----------------------------------------------------------------------------------
    @property
    def front(self):
        return self.net["front"]

    @property
    def mbox(self):
        raise AttributeError("a cluster has several converters: use converter(k) or instance(k)")

    def converter(self, k: int):
        """The k-th converter host (0-based)."""
        return self.net[f"conv{k + 1}"]

    @property
    def converters(self) -> list:
        return [self.converter(k) for k in range(self.topo.n)]

    def instance(self, k: int, family: int = 4) -> InstanceView:
        """Converter k as a single-box testbed (for `System.start`), its names in `family`."""
        return InstanceView(self, k, family)

    def instance_ip(self, k: int, family: int = 4) -> str:
        """Converter k's own (unicast) address: the one it announces for joins."""
        return self.topo.instance_addrs[k].outer(family)

    @property
    def server_ip(self) -> str:
        return self.topo.server_addr.outer_ip

    @property
    def mbox_client_ip(self) -> str:
        return VIP

    # -- configuration ---------------------------------------------------------------------------
    def _configure(self) -> None:
        hosts = [self.client, self.front, self.server, *self.converters]
        for host in hosts:
            for key, value in HOST_SYSCTLS.items():
                host.cmd(f"sysctl -qw {key}='{value}'")
            host.cmd("ip link set lo up")
        front = self.front
        front.cmd("sysctl -qw net.ipv4.ip_forward=1")
        front.cmd("sysctl -qw net.ipv4.fib_multipath_hash_policy=1")   # L4: ports in the hash
        six = 6 in self.families
        if six:
            front.cmd("sysctl -qw net.ipv6.conf.all.forwarding=1")
            front.cmd("sysctl -qw net.ipv6.fib_multipath_hash_policy=1")
            for a in (*self.topo.client_addrs, self.topo.server_addr, *self.topo.instance_addrs):
                self._checked(front, f"ip -6 addr add {a.mbox_ip6}/64 dev {a.intf_mbox} nodad")
        # A veth hands the front the sender's skb->hash, which the L4 multipath hash takes as is
        # (instead of hashing the headers, as a router on a wire does); the phone's kernel draws a
        # new one when a SYN is retransmitted (txrehash), which then hashed the retransmission to
        # another converter (20 of a fresh cluster's first 100 IPv6 connections). A wire's router
        # sees one 5-tuple per flow: the phone keeps its hash.
        self.client.cmd("sysctl -qw net.core.txrehash=0")
        # The phone: default route on WiFi, its 3G address leaves by 3G; it accepts announced
        # addresses and opens the extra subflow from its 3G address towards them.
        for family in self.families:
            self._multihome(self.client, self.topo.client_addrs, False, family)
        self.client.cmd("ip mptcp limits set subflow 2 add_addr_accepted 2")
        for family in self.families:
            self._checked(self.client, f"ip mptcp endpoint add {self.topo.client_addrs[1].outer(family)} "
                                       f"dev {self.topo.client_addrs[1].intf_outer} subflow fullmesh")
        a = self.topo.server_addr
        self.server.cmd(f"ip route replace default via {a.mbox_ip} dev {a.intf_outer}")
        if six:
            self._checked(self.server, f"ip -6 addr add {a.outer_ip6}/64 dev {a.intf_outer} nodad")
            self._checked(self.server, f"ip -6 route replace default via {a.mbox_ip6} dev {a.intf_outer}")
        for k, conv in enumerate(self.converters):
            s = self.topo.instance_addrs[k]
            conv.cmd(f"ip addr add {VIP}/32 dev lo")
            conv.cmd(f"ip route replace default via {s.mbox_ip} dev {s.intf_outer}")
            if six:
                self._checked(conv, f"ip -6 addr add {VIP6}/128 dev lo")
                self._checked(conv, f"ip -6 addr add {s.outer_ip6}/64 dev {s.intf_outer} nodad")
                self._checked(conv, f"ip -6 route replace default via {s.mbox_ip6} dev {s.intf_outer}")
            if self.cluster_pm:
                self.configure_pm(k)
            else:
                conv.cmd("ip mptcp limits set subflow 2 add_addr_accepted 0")
        self.route_vip()

    def configure_pm(self, k: int) -> None:
        """Converter k: C flag on, its own address announced, with the operator's command
        `mimbox pm --cluster OWN_ADDR`."""
        own = " ".join(f"--cluster {self.instance_ip(k, f)}" for f in self.families)
        out = self.converter(k).cmd(f"{sys.executable} -m mimbox.ops.cli pm --subflows 2 --add-addr-accepted 0 "
                                    f"{own} 2>&1; echo rc=$?")
        if "rc=0" not in out:
            raise RuntimeError(f"conv{k + 1}: mimbox pm --cluster: {out.strip()}")

    def route_vip(self, members: int | None = None) -> None:
        """The front tier: VIP over the first `members` converters (default: all), resilient buckets
        where the kernel has them."""
        front = self.front
        self.nexthop_ids = []
        for k, s in enumerate(self.topo.instance_addrs[:members]):
            nh = 1 + k
            front.cmd(f"ip nexthop replace id {nh} via {s.outer_ip} dev {s.intf_mbox}")
            self.nexthop_ids.append(nh)
        members = "/".join(map(str, self.nexthop_ids))
        out = ""
        if self.resilient:
            out = front.cmd(f"ip nexthop replace id {GROUP} group {members} {RESILIENT} 2>&1")
        if not self.resilient or out.strip():
            self.resilient = False   # an older kernel: plain hash-threshold multipath
            front.cmd(f"ip nexthop replace id {GROUP} group {members} 2>&1")
        out = front.cmd(f"ip route replace {VIP}/32 nhid {GROUP} 2>&1")
        if out.strip():
            raise RuntimeError(f"front: VIP route: {out.strip()}")
        if 6 in self.families:       # VIP6: the same members, IPv6 nexthops, the same kind of group
            ids6 = []
            for k, s in enumerate(self.topo.instance_addrs[:len(self.nexthop_ids)]):
                front.cmd(f"ip -6 nexthop replace id {101 + k} via {s.outer_ip6} dev {s.intf_mbox}")
                ids6.append(str(101 + k))
            kind = RESILIENT if self.resilient else ""
            self._checked(front, f"ip nexthop replace id {GROUP6} group {'/'.join(ids6)} {kind}")
            self._checked(front, f"ip -6 route replace {VIP6}/128 nhid {GROUP6}")
        self._resolve_members()

    def _resolve_members(self) -> None:
        """Resolve every member's neighbor entry on the front before traffic: the kernel's group
        skips a member whose neighbor is not yet valid, so a flow's first packets would hash to
        another converter than its later ones (seen over IPv6: 20 of a fresh cluster's first 100
        connections stalled at one converter and were reset by another)."""
        for s in self.topo.instance_addrs:
            for family in self.families:
                self.front.cmd(f"ping -{family} -n -c 1 -W 1 {s.outer(family)}")

    def steer_through_converters(self) -> None:
        """Transparent mode: the client's traffic towards the server takes the VIP's ECMP group
        too (policy routing on the front router), so converters on the path can intercept it."""
        for a in self.topo.client_addrs:
            self.front.cmd(f"ip rule add iif {a.intf_mbox} to {self.topo.server_addr.outer_ip}/32 table 100")
        out = self.front.cmd(f"ip route replace {self.topo.server_addr.outer_ip}/32 nhid {GROUP} table 100 2>&1")
        if out.strip():
            raise RuntimeError(f"front: steering route: {out.strip()}")

    def unsteer(self) -> None:
        """Undo steer_through_converters()."""
        for a in self.topo.client_addrs:
            self.front.cmd(f"ip rule del iif {a.intf_mbox} to {self.topo.server_addr.outer_ip}/32 table 100")
        self.front.cmd("ip route flush table 100")

    def watch(self, health_port: int, interval: float = 0.05) -> None:
        """Run the front tier's health check (topologies/healthcheck.py) on the converters'
        `--health-port`: one that stops answering leaves the VIP's group."""
        group_args = RESILIENT if self.resilient else ""
        members = [f"--member={nh}={self.instance_ip(k)}" for k, nh in enumerate(self.nexthop_ids)]
        self.checker = self.front.popen([sys.executable, "-m", "topologies.healthcheck", "--group", str(GROUP),
                                         "--group-args", group_args, "--port", str(health_port),
                                         "--interval", str(interval), *members],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = self.checker.stdout.readline()
        if "watching" not in first:
            raise RuntimeError(f"health check did not start: {first}{self.checker.stdout.read()}")

    def fail(self, k: int, power_off: bool = False, whole_host: bool = False) -> float:
        """Converter k fails. By default its converter crashes: SIGKILL to every `mimbox run` process
        (supervisor and workers; not their keepers, which exist to outlive such a crash and reset its
        connections). whole_host: every process of the host at once, keepers included (the kernel
        then ends the connections with FIN); power_off: that, and its link goes dark. Returns the
        seconds until the front router no longer hashes the VIP's flows to it (power-off: the kernel
        drops a nexthop whose link is down; crash: the health check of watch() drops it)."""
        from topologies.testbed import kill_namespace_processes
        t0 = time.monotonic()
        conv = self.converter(k)
        if whole_host or power_off:
            kill_namespace_processes(conv)
        else:
            crash_converter(conv)
        if power_off:
            conv.cmd(f"ip link set {self.topo.instance_addrs[k].intf_outer} down")
        nh = self.nexthop_ids[k]
        while not self._nexthop_gone(nh):
            if time.monotonic() - t0 > 10:
                raise RuntimeError(f"front still routes the VIP to conv{k + 1} after 10 s")
            time.sleep(0.001)
        return time.monotonic() - t0

    def _nexthop_gone(self, nh: int) -> bool:
        group = self.front.cmd(f"ip nexthop show id {GROUP}")
        members = group.split("group", 1)[1].split()[0] if "group" in group else ""
        return str(nh) not in members.split("/")

    @staticmethod
    def mib(host, name: str) -> int:
        """An MPTCP MIB counter of a host's namespace (`name` on the MPTcpExt lines of /proc/net/netstat)."""
        from topologies.testbed import counters
        c = counters(host)
        if not any(k.startswith("MPTcpExt") for k in c):
            raise RuntimeError("this kernel exposes no MPTcpExt counters")
        return c["MPTcpExt" + name]


def crash_converter(host) -> None:
    """SIGKILL every converter process in a host's namespace at once (a crash of the service)."""
    from mimbox.converter.core import is_keeper
    from topologies.testbed import namespace_pids
    for pid in namespace_pids(host):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"mimbox.ops.cli" in argv and b"run" in argv and not is_keeper(pid):
                os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass                  # gone meanwhile
