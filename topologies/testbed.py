"""The paper's worlds as Mininet topologies: client =(paths)= converter host (mbox) -- server.

    PaperTopo   Fig. 3: unshaped 10 Gbit/s-class veth links, two client paths.
    MobileTopo  §4.4: WiFi over ADSL (8M/512k, 20 ms RTT) + 3G (2M/256k, 80 ms RTT) to the converter,
                100 Mbit/s and 10 ms RTT from the converter to the server; optional loss.

Hosts are linked directly (no switches: this kernel has no Open vSwitch datapath); `mbox` forwards
IP, so with nothing started on it the topology is the paper's "router" baseline (the *direct*
variant: client and server speak MPTCP end to end). `Testbed` starts a topology and configures
routing and MPTCP the way a user of it needs; use it as a context manager so that everything is
torn down, also on errors and Ctrl-C:

    with Testbed(MobileTopo(client_loss=1.0)) as tb:
        print(tb.client.cmd("ping -c1", tb.server_ip))

From the shell: `mn --custom topologies/testbed.py --topo mimbox-paper --controller none --link emu`
builds the same hosts and links (without the routing set-up that Testbed adds).
"""
from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass, field

# `mn --custom` execs this file (without __file__): make the project importable either way.
try:
    _HERE = os.path.abspath(__file__)
except NameError:
    _args = " ".join(sys.argv).replace("--custom=", "--custom ").split()
    _HERE = os.path.abspath(next(p for p in _args[_args.index("--custom") + 1].split(",") if "testbed" in p))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

from mininet.link import Link  # noqa: E402
from mininet.net import Mininet  # noqa: E402
from mininet.node import Host  # noqa: E402
from mininet.topo import Topo  # noqa: E402

from topologies.links import EmuLink  # noqa: E402


@dataclass(frozen=True)
class PathSpec:
    """One client path (or server path): its name and what each direction of its link does."""
    name: str
    up: dict = field(default_factory=dict)    # shaping of what the client (or mbox) sends
    down: dict = field(default_factory=dict)  # shaping of what mbox (or the server) sends


@dataclass(frozen=True)
class Addr:
    """Addressing of path k on a side: subnet 10.0.<n>.0/24, .1 the outer host, .2 mbox; on a
    dual-stack topology also fd00:0:<n>::/64, ::1 the outer host, ::2 mbox."""
    n: int
    intf_outer: str
    intf_mbox: str

    @property
    def outer_ip(self) -> str:
        return f"10.0.{self.n}.1"

    @property
    def mbox_ip(self) -> str:
        return f"10.0.{self.n}.2"

    @property
    def subnet(self) -> str:
        return f"10.0.{self.n}.0/24"

    @property
    def outer_ip6(self) -> str:
        return f"fd00:0:{self.n}::1"

    @property
    def mbox_ip6(self) -> str:
        return f"fd00:0:{self.n}::2"

    @property
    def subnet6(self) -> str:
        return f"fd00:0:{self.n}::/64"

    def outer(self, family: int = 4) -> str:
        """The outer host's address in `family` (4 or 6)."""
        return self.outer_ip6 if family == 6 else self.outer_ip

    def mbox(self, family: int = 4) -> str:
        """mbox's address on this path in `family` (4 or 6)."""
        return self.mbox_ip6 if family == 6 else self.mbox_ip


class ConverterTopo(Topo):
    """client -- k paths -- mbox -- m paths -- server. Subclasses choose the paths.

    Dual-stack unless built with ipv6=False: every link has an IPv4 /24 and an IPv6 /64 (see Addr),
    mbox forwards both families, and MPTCP may add subflows in either."""

    client_paths: list[PathSpec]
    server_paths: list[PathSpec]
    ipv6: bool = True

    def build(self, client_paths: list[PathSpec], server_paths: list[PathSpec], ipv6: bool = True):
        """Add the three hosts and one link per path."""
        self.client_paths, self.server_paths, self.ipv6 = client_paths, server_paths, ipv6
        self.client_addrs, self.server_addrs = [], []
        client = self.addHost("client", ip=None)
        mbox = self.addHost("mbox", ip=None)
        server = self.addHost("server", ip=None)
        port = 0
        for i, path in enumerate(client_paths):
            a = Addr(1 + i, f"client-eth{i}", f"mbox-eth{port}")
            self.client_addrs.append(a)
            self.addLink(client, mbox, intfName1=a.intf_outer, intfName2=a.intf_mbox,
                         params1={"ip": a.outer_ip + "/24", **path.up},
                         params2={"ip": a.mbox_ip + "/24", **path.down})
            port += 1
        for j, path in enumerate(server_paths):
            # server subnets are 10.0.101.0/24, 10.0.102.0/24...; the server holds .1
            a = Addr(101 + j, f"server-eth{j}", f"mbox-eth{port}")
            self.server_addrs.append(a)
            self.addLink(server, mbox, intfName1=a.intf_outer, intfName2=a.intf_mbox,
                         params1={"ip": a.outer_ip + "/24", **path.down},
                         params2={"ip": a.mbox_ip + "/24", **path.up})
            port += 1


class PaperTopo(ConverterTopo):
    """Fig. 3: two unshaped client paths, one (or two) unshaped server paths."""

    def build(self, server_paths: int = 1, ipv6: bool = True):
        """`server_paths=2` gives the server a second path, for TCP client -> MPTCP server.
        ipv6=False: IPv4 only."""
        super().build([PathSpec("path1"), PathSpec("path2")],
                      [PathSpec(f"server{j + 1}") for j in range(server_paths)], ipv6)


class MobileTopo(ConverterTopo):
    """§4.4: the smartphone's WiFi (ADSL) and 3G links, the converter in the cloud."""

    WIFI = dict(up=dict(bw=0.512, delay="10ms"), down=dict(bw=8, delay="10ms"))
    CELL = dict(up=dict(bw=0.256, delay="40ms"), down=dict(bw=2, delay="40ms"))
    SERVER = dict(bw=100, delay="5ms")
    QUEUE_PACKETS = 100  # per direction; the paper does not give its queue sizes

    def build(self, client_loss: float = 0.0, server_loss: float = 0.0, seed: int = 1,
              queue_packets: int = QUEUE_PACKETS, ipv6: bool = True):
        """Loss is in percent, on both directions of the client links / the server link.
        ipv6=False: IPv4 only."""
        def shape(d: dict, loss: float, k: int) -> dict:
            out = dict(d, max_queue_size=queue_packets, seed=seed * 100 + k)
            if loss:
                out["loss"] = loss
            return out
        client = [PathSpec("wifi", shape(self.WIFI["up"], client_loss, 1), shape(self.WIFI["down"], client_loss, 2)),
                  PathSpec("3g", shape(self.CELL["up"], client_loss, 3), shape(self.CELL["down"], client_loss, 4))]
        server = [PathSpec("server", shape(self.SERVER, server_loss, 5), shape(self.SERVER, server_loss, 6))]
        super().build(client, server, ipv6)


class LabHost(Host):
    """A Mininet host with the operations the figure modules use on any testbed host (the remote
    backend's topologies.remote.RemoteHost has the same): files, run directories, a CPU box, a
    converter's statistics. A Mininet host shares this machine's file system, so a file is simply
    written here and `get` is the path itself."""
    remote = False

    @property
    def python(self) -> str:
        """The interpreter that has mimbox and this checkout's experiments."""
        return sys.executable

    @property
    def mptcpize(self) -> str:
        """The MPTCP LD_PRELOAD shim."""
        from mimbox.paths import MPTCPIZE
        return str(MPTCPIZE)

    def run(self, command: str) -> str:
        """A command that must succeed (its exit status checked); its output."""
        out = self.cmd(command + "; echo mimbox-rc:$?")
        body, _, rc = out.rpartition("mimbox-rc:")
        if rc.strip() != "0":
            raise RuntimeError(f"{self.name}: `{command}` exited {rc.strip()}: {body.strip()[-500:]}")
        return body

    def write_file(self, path: str, data, mode: int = 0o644) -> None:
        """Write a file (this machine's file system)."""
        with open(path, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(path, mode)

    def get(self, remote: str, local: str) -> str:
        """The file at `remote` is already here: its path."""
        return remote

    def mkdtemp(self, tag: str) -> str:
        """A private run directory, removed when this process exits (experiments.systems.run_dir)."""
        from experiments.systems import run_dir
        d = run_dir(tag)
        os.chmod(d, 0o755)
        return d

    def cpu_quota(self, name: str, cores):
        """A CPU box (topologies.regimes.CpuQuota), created."""
        from topologies.regimes import CpuQuota
        return CpuQuota(name, cores).create()

    def stats(self, path: str) -> dict:
        """A converter's statistics socket (mimbox.converter.stats)."""
        from mimbox.converter.stats import query
        return query(path)


HOST_SYSCTLS = {
    "net.mptcp.enabled": "1",
    "net.ipv4.tcp_tw_reuse": "1",                 # connection-per-request load (wrk, Connection: close)
    "net.ipv4.ip_local_port_range": "1024 65000",
    # never an ephemeral port: what listeners in tests and experiments use (ports named in tests are
    # 5000-9999; topologies.support.ALLOCATE hands out 17000 on), else a busy run's outgoing
    # connections can take a port a converter is about to listen on (EADDRINUSE)
    "net.ipv4.ip_local_reserved_ports": "5000-9999,17000-17999",
    "net.ipv4.conf.all.rp_filter": "0",           # multipath: replies may come back on another interface
    "net.ipv4.conf.default.rp_filter": "0",
}


def counters(host) -> dict[str, int]:
    """Every SNMP/MIB counter of a host's namespace (/proc/net/snmp and /proc/net/netstat), by
    nstat's names (`TcpRetransSegs`, `TcpExtTCPTimeouts`, `MPTcpExtMPJoinSynRx`, ...)."""
    out: dict[str, int] = {}
    lines = host.cmd("cat /proc/net/snmp /proc/net/netstat").splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        names, values = head.split(), vals.split()
        if names and values and names[0] == values[0]:
            prefix = names[0].rstrip(":")
            for n, v in zip(names[1:], values[1:]):
                if v.lstrip("-").isdigit():
                    out[prefix + n] = int(v)
    return out


class Testbed:
    """A started, configured network of a ConverterTopo; a context manager that always cleans up."""
    __test__ = False  # not a pytest class, despite the name

    def __init__(self, topo: ConverterTopo, mptcp_subflows: bool = True):
        self.topo = topo
        self.mptcp_subflows = mptcp_subflows
        self.net: Mininet | None = None

    # -- names a user of the testbed needs ------------------------------------------------------
    @property
    def client(self):
        return self.net["client"]

    @property
    def mbox(self):
        return self.net["mbox"]

    @property
    def server(self):
        return self.net["server"]

    client_family = server_family = 4   # what server_ip, mbox_client_ip, client_ips give (view() changes it)
    remote = False
    CPUS = {"client": "0", "server": "0", "mbox": "1"}   # end hosts on one core, the converter the other

    def cpus(self, role: str) -> str:
        """The cores `role`'s processes are pinned to (client, mbox, server): on this machine end
        hosts share core 0 and the converter has core 1, like the paper's separate boxes."""
        return self.CPUS[role]

    @property
    def converter_cores(self) -> int:
        """How many cores the converter host has (a system with one loop per core uses them all)."""
        return os.cpu_count() or 1

    def one_path(self) -> None:
        """The client keeps only its first path (no join subflow): Table 1's captures see every segment."""
        self.client.cmd("ip mptcp endpoint flush")

    def sysctl(self, host, key: str, value: str) -> None:
        """Set a sysctl of `host` for this testbed's life (a Mininet host's namespace goes with it)."""
        self._checked(host, f"sysctl -qw {key}='{value}'")

    @property
    def server_ip(self) -> str:
        return self.topo.server_addrs[0].outer(self.server_family)

    @property
    def mbox_client_ip(self) -> str:
        """The converter's address on the client's first path (where explicit clients connect)."""
        return self.topo.client_addrs[0].mbox(self.client_family)

    @property
    def client_ips(self) -> list[str]:
        return [a.outer(self.client_family) for a in self.topo.client_addrs]

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions the testbed's links carry: (4, 6) for a dual-stack topology."""
        return (4, 6) if getattr(self.topo, "ipv6", False) else (4,)

    def view(self, client: int = 4, server: int = 4) -> "FamilyView":
        """This testbed with server_ip in family `server` and mbox_client_ip, client_ips in family
        `client` (IPv6 client -> IPv4 server and back: the converter translates families). Systems
        and tests take the view wherever they take the testbed."""
        return FamilyView(self, client, server)

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "Testbed":
        """Build and start the network, then configure routing and MPTCP."""
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            # `kill`/`timeout` must unwind through stop() too, not leave hosts and processes behind
            signal.signal(signal.SIGTERM, _raise_system_exit)
        self.net = Mininet(topo=self.topo, link=EmuLink, host=LabHost, controller=None, build=False,
                           autoSetMacs=True, waitConnected=False)
        try:
            self.net.build()
            self.net.start()
            self._configure()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every host and link (delay lines included); safe to call twice."""
        net, self.net = self.net, None
        if net is not None:
            old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not abort teardown
            try:
                for host in net.hosts:
                    kill_namespace_processes(host)
                    _release_shell(host)
                net.stop()
            finally:
                signal.signal(signal.SIGINT, old)

    def __enter__(self) -> "Testbed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def dropped_packets(self) -> int:
        """Packets the links' loss emulation has dropped so far, all links and directions."""
        from topologies.links import EmuIntf
        return sum(intf.dropped() for link in self.net.links for intf in (link.intf1, link.intf2)
                   if isinstance(intf, EmuIntf))

    # -- configuration ---------------------------------------------------------------------------
    def _configure(self) -> None:
        for host in (self.client, self.mbox, self.server):
            for key, value in HOST_SYSCTLS.items():
                host.cmd(f"sysctl -qw {key}='{value}'")
            host.cmd("ip link set lo up")
        self.mbox.cmd("sysctl -qw net.ipv4.ip_forward=1")
        if 6 in self.families:
            self.mbox.cmd("sysctl -qw net.ipv6.conf.all.forwarding=1")
            for addrs in (self.topo.client_addrs, self.topo.server_addrs):
                for a in addrs:
                    # nodad: usable at once (duplicate address detection would hold them ~1 s)
                    self._checked(self.mbox, f"ip -6 addr add {a.mbox_ip6}/64 dev {a.intf_mbox} nodad")
        for host, addrs, on_link in ((self.client, self.topo.client_addrs, False),
                                     (self.server, self.topo.server_addrs, True)):
            for family in self.families:
                self._multihome(host, addrs, on_link, family)
        for host, addrs in ((self.client, self.topo.client_addrs), (self.server, self.topo.server_addrs)):
            n = max(2, len(addrs))
            host.cmd(f"ip mptcp limits set subflow {n} add_addr_accepted {n}")
            if self.mptcp_subflows:
                for a in addrs[1:]:
                    for family in self.families:   # the path manager uses those of the connection's family
                        self._checked(host, f"ip mptcp endpoint add {a.outer(family)} subflow")
        # The converter accepts subflows from its clients and opens its own towards a multi-homed server.
        self.mbox.cmd("ip mptcp limits set subflow 4 add_addr_accepted 4")
        for a in self.topo.server_addrs[1:]:
            for family in self.families:
                ip = f"ip -{family}"
                self._checked(self.mbox, f"ip mptcp endpoint add {a.mbox(family)} subflow")
                self._checked(self.mbox, f"{ip} rule add from {a.mbox(family)} table {a.n}")
                self._checked(self.mbox, f"{ip} route add {a.subnet6 if family == 6 else a.subnet} "
                                         f"dev {a.intf_mbox} table {a.n}")
                self._checked(self.mbox, f"{ip} route add default via {a.outer(family)} dev {a.intf_mbox} table {a.n}")

    @staticmethod
    def _checked(host, cmd: str) -> None:
        """host.cmd(cmd), failing loudly if it printed an error (the set-up commands print nothing)."""
        out = host.cmd(cmd).strip()
        if out:
            raise RuntimeError(f"{host.name}: {cmd}: {out}")

    @classmethod
    def _multihome(cls, host, addrs: list[Addr], other_subnets_on_link: bool, family: int = 4) -> None:
        """Default route on the first path; per-source tables so each subflow leaves by its own link
        (IPv6: the addresses too, which Mininet sets for IPv4 only).

        other_subnets_on_link=False is a phone: what leaves from its 3G address goes over 3G, even
        to the converter's WiFi-side address (else the 3G subflow to an explicit converter would
        ride the WiFi uplink). True is a multi-homed server: a peer address on another path's
        subnet is reached over that path, as the peer's subflow came in."""
        ip = f"ip -{family}"
        if family == 6:
            for a in addrs:
                cls._checked(host, f"ip -6 addr add {a.outer_ip6}/64 dev {a.intf_outer} nodad")
        host.cmd(f"{ip} route replace default via {addrs[0].mbox(family)} dev {addrs[0].intf_outer}")
        for a in addrs:
            host.cmd(f"{ip} rule add from {a.outer(family)} table {a.n}")
            for b in addrs:
                if b is a or other_subnets_on_link:
                    subnet = b.subnet6 if family == 6 else b.subnet
                    host.cmd(f"{ip} route add {subnet} dev {b.intf_outer} {'scope link ' if family == 4 else ''}"
                             f"table {a.n}")
            host.cmd(f"{ip} route add default via {a.mbox(family)} dev {a.intf_outer} table {a.n}")


class FamilyView:
    """A Testbed seen by a client of one IP version and a server of one (Testbed.view()):
    server_ip, mbox_client_ip and client_ips are of those families, everything else is the
    testbed's own (hosts, counters, the topology)."""
    __test__ = False

    def __init__(self, tb: Testbed, client: int, server: int):
        """client, server: 4 or 6 (6 needs a dual-stack topology)."""
        for f in (client, server):
            if f not in tb.families:
                raise ValueError(f"IPv{f} is not on this testbed (its families: {tb.families})")
        self.tb, self.client_family, self.server_family = tb, client, server

    server_ip = Testbed.server_ip
    mbox_client_ip = Testbed.mbox_client_ip
    client_ips = Testbed.client_ips

    def __getattr__(self, name):
        return getattr(self.tb, name)

    def __repr__(self) -> str:
        return f"IPv{self.client_family}-client/IPv{self.server_family}-server"


def _raise_system_exit(signum, frame):
    raise SystemExit(128 + signum)


def _release_shell(host, timeout_s: float = 5.0) -> None:
    """After an interrupted host.cmd() (Ctrl-C, SIGTERM), let the host's shell finish the killed
    command so that teardown can use it again."""
    import time
    deadline = time.monotonic() + timeout_s
    while host.waiting and time.monotonic() < deadline:
        host.monitor(timeoutms=200)
    host.waiting = False


def namespace_pids(host) -> list[int]:
    """The processes in a host's network namespace, but the host's own shell and this process."""
    try:
        ns = os.readlink(f"/proc/{host.pid}/ns/net")
    except OSError:
        return []
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) in (host.pid, os.getpid()):
            continue
        try:
            if os.readlink(f"/proc/{pid}/ns/net") == ns:
                out.append(int(pid))
        except (FileNotFoundError, PermissionError):
            pass                  # gone meanwhile, or not ours to read
    return out


def kill_namespace_processes(host) -> None:
    """Kill every process left in a host's network namespace (servers, peers, clients a run started),
    except the host's own shell, which Mininet stops."""
    for pid in namespace_pids(host):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass                  # gone meanwhile


# For `mn --custom topologies/testbed.py --topo mimbox-paper --controller none --link emu`.
topos = {"mimbox-paper": PaperTopo, "mimbox-mobile": MobileTopo}
# Mininet 2.3.0's mn ignores a custom `links` dict (a missing comma in setCustom), but replaces its
# LINKS table with one of this name: keep Mininet's own entries and add ours.
from mininet.link import OVSLink, TCLink, TCULink  # noqa: E402
LINKS = {"default": Link, "tc": TCLink, "tcu": TCULink, "ovs": OVSLink, "emu": EmuLink}
