"""A figure's testbed on the machines of a hosts file (topologies.lab.RemoteLab): the names and
operations of topologies.testbed.Testbed, set up on start() and undone on stop() -- sysctls (old
values restored), forwarding on the converter, routes between the paths, the client's MPTCP
endpoints and limits, the figure's link shaping on the hosts' own interfaces."""
from __future__ import annotations

import re

from topologies.hostsfile import Lab
from topologies.lab import LabRefused, RemoteLab
from topologies.remote import RemoteError, RemoteHost
from topologies.testbed import HOST_SYSCTLS, FamilyView, Testbed


def shaping_commands(intf: str, params: dict) -> list[str]:
    """tc commands shaping what `intf` sends as topologies.links.EmuLink's parameters say (bw in
    Mbit/s, delay, loss in percent, max_queue_size in packets): an HTB class at the rate, then
    netem for delay and loss (which a real host's kernel has) or a packet FIFO for the queue."""
    from topologies.links import DEFAULT_QUEUE_PACKETS, parse_delay_ms
    bw, delay = params.get("bw"), parse_delay_ms(params.get("delay"))
    loss, queue = float(params.get("loss") or 0), int(params.get("max_queue_size") or DEFAULT_QUEUE_PACKETS)
    cmds, parent = [], "root"
    if bw is not None:
        cmds += [f"tc qdisc replace dev {intf} root handle 1: htb default 1",
                 f"tc class add dev {intf} parent 1: classid 1:1 htb rate {bw:g}mbit burst 15k"]
        parent = "parent 1:1 handle 10:"
    if delay or loss:
        cmds.append(f"tc qdisc replace dev {intf} {parent} netem limit {queue}"
                    + (f" delay {delay:g}ms" if delay else "") + (f" loss {loss:g}%" if loss else ""))
    elif bw is not None:
        cmds.append(f"tc qdisc add dev {intf} {parent} pfifo limit {queue}")
    return cmds



class RemoteTestbed:
    """A figure's testbed on the lab's hosts: the names of topologies.testbed.Testbed (client, mbox,
    server, server_ip, mbox_client_ip, client_ips, families, view(), cpus()), set up on start() and
    undone on stop(): sysctls (old values restored), forwarding on the converter, routes between
    the paths, the client's MPTCP endpoints and limits."""
    __test__ = False
    remote = True
    client_family = server_family = 4
    families = (4,)
    server_ip = Testbed.server_ip
    mbox_client_ip = Testbed.mbox_client_ip
    client_ips = Testbed.client_ips

    def __init__(self, lab: RemoteLab, topo):
        """topo: the figure's topology (topologies.testbed); its paths' shaping, if any, is applied
        to the hosts' own interfaces. The hosts file must have at least as many paths."""
        for kind, want, have in (("client", getattr(topo, "client_paths", []), lab.lab.client_paths),
                                 ("server", getattr(topo, "server_paths", []), lab.lab.server_paths)):
            if len(want) > len(have):
                raise LabRefused([f"this figure needs {len(want)} {kind} paths; {lab.lab.path} has {len(have)}"])
        self.shaping = [(spec, addr) for specs, addrs in ((getattr(topo, "client_paths", []), lab.lab.client_paths),
                                                          (getattr(topo, "server_paths", []), lab.lab.server_paths))
                        for spec, addr in zip(specs, addrs) if spec.up or spec.down]
        self.lab, self.topo = lab, _RemoteTopo(lab.lab)
        self._undo: dict[str, list[str]] = {}
        self._steps: dict[str, list[tuple[str, str | None]]] = {}

    @property
    def client(self) -> RemoteHost:
        return self.lab.hosts["client"]

    @property
    def mbox(self) -> RemoteHost:
        return self.lab.hosts["converter"]

    @property
    def server(self) -> RemoteHost:
        return self.lab.hosts["server"]

    def cpus(self, role: str) -> str:
        """The cores the hosts file pins `role` (client, mbox, server) to."""
        return self.lab.lab.hosts["converter" if role == "mbox" else role].cpus

    @property
    def converter_cores(self) -> int:
        return int(self.mbox.run("nproc").strip())

    def view(self, client: int = 4, server: int = 4) -> FamilyView:
        return FamilyView(self, client, server)

    def path_rtts(self, count: int = 10) -> list[dict]:
        """Each path's round-trip time, measured from its outer host (the manifest's link fidelity)."""
        rows = []
        for host, addrs in ((self.client, self.topo.client_addrs), (self.server, self.topo.server_addrs)):
            for a in addrs:
                out = host.cmd(f"ping -q -n -c {count} -i 0.05 -I {a.outer_ip} {a.mbox_ip}")
                m = re.search(r"= ([\d.]+)/([\d.]+)/([\d.]+)", out)
                rows.append({"link": f"{host.name}:{a.intf_outer}->{self.mbox.name}:{a.intf_mbox}",
                             "rtt_ms": float(m.group(2)) if m else None,
                             "rtt_ms_min": float(m.group(1)) if m else None, "shaped": False})
        return rows

    def dropped_packets(self) -> int:
        return 0     # no link emulation: nothing drops on purpose

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> "RemoteTestbed":
        try:
            self._configure()
        except BaseException:
            self.stop()
            raise
        return self

    def _do(self, host: RemoteHost, command: str, undo: str | None = None) -> None:
        """A set-up step (and the command that undoes it), run by _apply() with the host's others."""
        self._steps.setdefault(host.name, []).append((command, undo))

    def _apply(self) -> None:
        """Every host's steps as one script (one SSH round trip per host); a step's undo is kept
        only once it has run, and the first failing step stops its host's script and is raised."""
        def one(role, host):
            steps = self._steps.pop(host.name, [])
            script = "f=$(mktemp); " + "; ".join(f"{{ {cmd} ; }} >$f 2>&1 && echo mimbox-step:{k} || "
                                                 f"{{ echo mimbox-failed:{k}; cat $f; rm -f $f; exit 1; }}"
                                                 for k, (cmd, _) in enumerate(steps))
            out = host.cmd(script + "; rm -f $f") if steps else ""
            done = {int(x) for x in re.findall(r"mimbox-step:(\d+)", out)}
            self._undo.setdefault(host.name, []).extend(u for k, (_, u) in enumerate(steps) if k in done and u)
            failed = re.search(r"mimbox-failed:(\d+)\n?(.*)", out, re.S)
            if failed and " netem " in steps[int(failed.group(1))][0]:
                raise LabRefused([f"{host.name} ({host.spec.target}): cannot emulate delay or loss on its interfaces: "
                                  f"`{steps[int(failed.group(1))][0]}`: {failed.group(2).strip()[-200:]} "
                                  "(its kernel needs sch_netem)"])
            if failed or len(done) != len(steps):
                k = int(failed.group(1)) if failed else len(done)
                raise RemoteError(f"{host.name}: `{steps[k][0]}`: {(failed.group(2) if failed else out).strip()[-300:]}")
        self.lab._parallel(one)

    def _configure(self) -> None:
        t = self.topo
        keys = [*HOST_SYSCTLS, "net.ipv4.ip_forward"]
        for host in (self.client, self.mbox, self.server):      # what each host has now, read at once
            lines = host.run(f"sysctl -n {' '.join(keys)}; ip mptcp limits show").splitlines()
            old = dict(zip(keys, (v.strip().replace("\t", " ") for v in lines)))
            want = dict(HOST_SYSCTLS, **({"net.ipv4.ip_forward": "1"} if host is self.mbox else {}))
            for key, value in want.items():
                if old.get(key) != value:
                    self._do(host, f"sysctl -qw {key}='{value}'", f"sysctl -qw {key}='{old[key]}'")
            limits = " ".join(lines[len(keys):]).split()
            limits = dict(zip(limits[::2], limits[1::2]))
            n = 4 if host is self.mbox else max(2, len(t.client_addrs if host is self.client else t.server_addrs))
            self._do(host, f"ip mptcp limits set subflow {n} add_addr_accepted {n}",
                     f"ip mptcp limits set subflow {limits.get('subflows', 2)} "
                     f"add_addr_accepted {limits.get('add_addr_accepted', 0)}")
        # the client reaches the server through the converter, from its first path by default and
        # from each path's address over that path (a subflow leaves by its own link)
        first = t.client_addrs[0]
        for s in t.server_addrs:
            self._do(self.client, f"ip route replace {s.subnet} via {first.mbox_ip} dev {first.intf_outer}",
                     f"ip route del {s.subnet} via {first.mbox_ip} dev {first.intf_outer}")
        for a in t.client_addrs:
            table = 7000 + a.n
            self._do(self.client, f"ip rule add from {a.outer_ip} table {table}",
                     f"ip rule del from {a.outer_ip} table {table}")
            self._do(self.client, f"ip route add {a.subnet} dev {a.intf_outer} table {table}",
                     f"ip route flush table {table}")
            self._do(self.client, f"ip route add default via {a.mbox_ip} dev {a.intf_outer} table {table}")
            self._do(self.server, f"ip route replace {a.subnet} via {t.server_addrs[0].mbox_ip} "
                                  f"dev {t.server_addrs[0].intf_outer}",
                     f"ip route del {a.subnet} via {t.server_addrs[0].mbox_ip} dev {t.server_addrs[0].intf_outer}")
        for spec, a in self.shaping:
            client_side = a in t.client_addrs       # a client path: "up" is what the client sends
            outer = self.client if client_side else self.server
            for host, intf, params in ((outer, a.intf_outer, spec.up if client_side else spec.down),
                                       (self.mbox, a.intf_mbox, spec.down if client_side else spec.up)):
                if params:
                    for cmd in shaping_commands(intf, params):
                        self._do(host, cmd, f"tc qdisc del dev {intf} root" if " root " in cmd else None)
        for a in t.client_addrs[1:]:
            self._do(self.client, f"ip mptcp endpoint add {a.outer_ip} dev {a.intf_outer} subflow",
                     f"ip mptcp endpoint delete id $(ip mptcp endpoint show | awk '$1 == \"{a.outer_ip}\" "
                     "{for (i = 1; i < NF; i++) if ($i == \"id\") print $(i + 1)}')")
        self._apply()

    def sysctl(self, host: RemoteHost, key: str, value: str) -> None:
        """Set a sysctl of `host` now; its value before this testbed is restored by stop()."""
        old = host.run(f"sysctl -n {key}").strip().replace("\t", " ")
        host.run(f"sysctl -qw {key}='{value}'")
        undo = f"sysctl -qw {key}='{old}'"
        if not any(u.startswith(f"sysctl -qw {key}=") for u in self._undo.get(host.name, [])):
            self._undo.setdefault(host.name, []).append(undo)      # the first old value is the host's own

    def one_path(self) -> None:
        """The client keeps only its first path: the endpoints this testbed added go (theirs stay)."""
        for undo in list(self._undo.get("client", [])):
            if "mptcp endpoint delete" in undo:
                self.client.cmd(undo)
                self._undo["client"].remove(undo)

    def stop(self) -> None:
        """Stop every process started on the hosts and undo the set-up, last step first."""
        errors = []
        self.lab._parallel(lambda role, host: host.stop_processes())

        def undo(role, host):
            steps = list(reversed(self._undo.pop(host.name, [])))
            if steps:           # one script: every step runs, each failure is reported
                out = host.cmd("; ".join(f"{{ {u} ; }} >/dev/null 2>&1 || echo 'mimbox-undo-failed: {k}'"
                                         for k, u in enumerate(steps)))
                errors.extend(f"{host.name}: {steps[int(k)]}" for k in re.findall(r"mimbox-undo-failed: (\d+)", out))
        self.lab._parallel(undo)
        if errors:
            raise RemoteError("undoing the testbed set-up: " + "; ".join(errors))

    def __enter__(self) -> "RemoteTestbed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _RemoteTopo:
    """What experiments read of a topology (topologies.testbed.ConverterTopo's addresses)."""
    ipv6 = False

    def __init__(self, lab: Lab):
        self.client_addrs, self.server_addrs = lab.client_paths, lab.server_paths
