"""A real SSH lab on one machine: the paper's three hosts (four with a router) as network namespaces,
each running Debian's `sshd` with a key made for the rig, wired like the paper's testbed and
reachable from here over a management network only. The remote harness (topologies.remote) drives
it exactly as it drives real machines; the rig is how that harness is tested, and how a user can try
`--hosts` before pointing it at a lab.

    client  eth1 10.70.1.1 -- 10.70.1.2 eth1  converter  eth3 10.70.101.2 -- 10.70.101.1 eth1  server
            eth2 10.70.2.1 -- 10.70.2.2 eth2
    every host: eth0 172.30.<n>.2 (management), this machine 172.30.<n>.1 (n: one /24 per host)

Each host has a file system view of its own where it matters: its work directory is a private tmpfs
(sshd runs in a mount namespace of its own), so nothing reaches a host but what the harness copies
there. `with SSHRig() as rig: rig.hosts_file` is a hosts file for `--hosts`; close() (also after an
error or Ctrl-C) stops every sshd and removes the namespaces and links.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass

from topologies.support import NotWithin, wait_until

SSHD = "/usr/sbin/sshd"
ROLES = ("client", "converter", "server")


@dataclass(frozen=True)
class RigLink:
    """One data link: (role, interface, address/prefix) at each end."""
    a: tuple[str, str, str]
    b: tuple[str, str, str]


LINKS = (RigLink(("client", "eth1", "10.70.1.1/24"), ("converter", "eth1", "10.70.1.2/24")),
         RigLink(("client", "eth2", "10.70.2.1/24"), ("converter", "eth2", "10.70.2.2/24")),
         RigLink(("server", "eth1", "10.70.101.1/24"), ("converter", "eth3", "10.70.101.2/24")))


def _free_slot() -> int:
    """The first management slot (four /24s of 172.30.0.0/16) no interface of this machine uses."""
    used = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
    for slot in range(60):
        if f" 172.30.{slot * 4 + 1}.1/" not in used:
            return slot
    raise RigError("no free management subnet in 172.30.0.0/16")


def _system_mounts() -> list[str]:
    """The mount commands that give a namespace's fresh /sys this machine's cgroup hierarchies and a
    BPF file system (read from /proc/mounts: v1 controllers, cgroup2, bpffs)."""
    cmds = []
    with open("/proc/mounts") as f:
        mounts = [line.split() for line in f]
    for dev, where, fstype, opts, *_ in mounts:
        if where == "/sys/fs/cgroup" and fstype == "tmpfs":
            cmds.append("mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup")
        elif fstype in ("cgroup", "cgroup2", "bpf") and where.startswith("/sys/fs/"):
            keep = ",".join(o for o in opts.split(",") if o not in ("rw", "relatime", "nosuid", "nodev", "noexec"))
            cmds.append(f"mkdir -p {where} && mount -t {fstype} {'-o ' + keep if keep else ''} {dev} {where}")
    return cmds


class RigError(RuntimeError):
    """The rig could not be built (sshd missing, a namespace refused)."""


class SSHRig:
    """The namespaces, links and sshd processes of one rig; see the module's docstring."""

    def __init__(self, without_mptcp: tuple[str, ...] = (), refuse_ssh: tuple[str, ...] = ()):
        """without_mptcp: roles whose namespace has net.mptcp.enabled=0; refuse_ssh: roles whose sshd
        accepts no key (the negative tests' broken hosts)."""
        if not os.path.exists(SSHD):
            raise RigError(f"{SSHD} is missing (Debian: openssh-server; ./mimbox.sh installs it)")
        self.tag = uuid.uuid4().hex[:6]
        self.dir = tempfile.mkdtemp(prefix=f"mimbox-rig-{self.tag}-")
        self.workdir = os.path.join(self.dir, "work")   # each host's private tmpfs is mounted here
        self.ns = {r: f"mimbox-rig-{r[:3]}-{self.tag}" for r in ROLES}
        self.slot = _free_slot()         # two rigs at once take apart management subnets
        self.mgmt = {r: f"172.30.{self.slot * 4 + k + 1}.2" for k, r in enumerate(ROLES)}
        self.sshd: dict[str, subprocess.Popen] = {}
        self.made: list[str] = []
        self.key = os.path.join(self.dir, "id_ed25519")
        self.without_mptcp, self.refuse_ssh = without_mptcp, refuse_ssh
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # -- set-up ----------------------------------------------------------------------------------
    @staticmethod
    def _sh(cmd: str, ns: str | None = None) -> None:
        argv = ["ip", "netns", "exec", ns, "sh", "-c", cmd] if ns else ["sh", "-c", cmd]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if p.returncode:
            raise RigError(f"{cmd}: {p.stderr.strip() or p.stdout.strip()}")

    def _build(self) -> None:
        os.makedirs(self.workdir)
        os.makedirs("/run/sshd", exist_ok=True)          # sshd's privilege-separation directory
        self._sh(f"ssh-keygen -q -t ed25519 -N '' -C mimbox-rig -f {self.key}")
        self._sh(f"ssh-keygen -q -t ed25519 -N '' -C mimbox-rig-host -f {self.dir}/host_key")
        shutil.copy(self.key + ".pub", os.path.join(self.dir, "authorized_keys"))
        for k, role in enumerate(ROLES):
            ns = self.ns[role]
            self._sh(f"ip netns add {ns}")
            self.made.append(ns)
            self._sh("ip link set lo up; sysctl -qw net.ipv4.conf.all.rp_filter=0 "
                     "net.ipv4.conf.default.rp_filter=0", ns)
            if role in self.without_mptcp:
                self._sh("sysctl -qw net.mptcp.enabled=0", ns)
            outside = f"rm{k + 1}{self.tag}"
            self._sh(f"ip link add {outside} type veth peer name tmp{self.tag}; "
                     f"ip link set tmp{self.tag} netns {ns}; ip addr add 172.30.{self.slot * 4 + k + 1}.1/24 dev {outside}; "
                     f"ip link set {outside} up")
            self._sh(f"ip link set tmp{self.tag} name eth0; ip addr add {self.mgmt[role]}/24 dev eth0; "
                     "ip link set eth0 up", ns)
        for n, link in enumerate(LINKS):
            (ra, ia, aa), (rb, ib, ab) = link.a, link.b
            self._sh(f"ip link add ta{self.tag} netns {self.ns[ra]} type veth peer name tb{self.tag} "
                     f"netns {self.ns[rb]}")
            for role, tmp, intf, addr in ((ra, f"ta{self.tag}", ia, aa), (rb, f"tb{self.tag}", ib, ab)):
                self._sh(f"ip link set {tmp} name {intf}; ip addr add {addr} dev {intf}; ip link set {intf} up",
                         self.ns[role])
        for role in ROLES:
            self._start_sshd(role)

    def _start_sshd(self, role: str) -> None:
        cfg = os.path.join(self.dir, f"sshd-{role}.conf")
        keys = os.path.join(self.dir, "authorized_keys" if role not in self.refuse_ssh else "no_keys")
        with open(cfg, "w") as f:
            f.write("\n".join([
                f"ListenAddress {self.mgmt[role]}", "Port 22", f"HostKey {self.dir}/host_key",
                f"PidFile {self.dir}/sshd-{role}.pid", f"AuthorizedKeysFile {keys}",
                "PermitRootLogin prohibit-password", "PasswordAuthentication no",
                "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", "UseDNS no",
                "MaxSessions 100", "MaxStartups 100", "Subsystem sftp internal-sftp", ""]))
        # a mount namespace of its own: its work directory is a tmpfs nobody else sees; `ip netns
        # exec` gives it a sysfs of its namespace, where this machine's cgroup and BPF file systems
        # are mounted again (a host has its own)
        script = " && ".join([f"mount -t tmpfs -o size=1g,mode=0755 mimbox-rig {self.workdir}",
                              *_system_mounts(), f"exec {SSHD} -D -e -f {cfg}"])
        self.sshd[role] = subprocess.Popen(
            ["ip", "netns", "exec", self.ns[role], "unshare", "--mount", "--propagation", "private",
             "sh", "-c", script], stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.dir, f"sshd-{role}.log"), "w"))
        def up() -> bool:
            if self.sshd[role].poll() is not None:
                raise RigError(f"sshd for {role} did not start: {self.log(role)[-500:]}")
            return self._listening(role)
        try:
            wait_until(up, 15, f"sshd for {role} listening")
        except NotWithin:
            raise RigError(f"sshd for {role} did not start: {self.log(role)[-500:]}") from None

    def _listening(self, role: str) -> bool:
        p = subprocess.run(["ip", "netns", "exec", self.ns[role], "ss", "-Hltn", "sport = :22"],
                           capture_output=True, text=True, timeout=10)
        return bool(p.stdout.strip())

    def log(self, role: str) -> str:
        """What a host's sshd wrote (its -e log)."""
        try:
            with open(os.path.join(self.dir, f"sshd-{role}.log")) as f:
                return f.read()
        except OSError:
            return ""

    # -- what a user of the rig needs ------------------------------------------------------------
    def hosts_toml(self, ports: tuple[int, ...] = ()) -> str:
        """A hosts file (topologies.hostsfile) for this rig."""
        lines = ["# the SSH rig of topologies/sshrig.py: three namespaces on this machine", "[defaults]",
                 'user = "root"', f'key = "{self.key}"', f'workdir = "{self.workdir}"', "known_hosts = false", ""]
        cpus = {"client": "0", "converter": "1", "server": "0"}
        for role in ROLES:
            lines += [f"[{role}]", f'ssh = "{self.mgmt[role]}"', f'cpus = "{cpus[role]}"', ""]
        for link in LINKS[:2]:
            lines += ["[[client_path]]", f'client = {{ interface = "{link.a[1]}", address = "{link.a[2]}" }}',
                      f'converter = {{ interface = "{link.b[1]}", address = "{link.b[2]}" }}', ""]
        link = LINKS[2]
        lines += ["[[server_path]]", f'server = {{ interface = "{link.a[1]}", address = "{link.a[2]}" }}',
                  f'converter = {{ interface = "{link.b[1]}", address = "{link.b[2]}" }}', ""]
        return "\n".join(lines)

    def write_hosts_file(self, path: str | None = None) -> str:
        """Write hosts_toml() (into the rig's directory unless `path`); returns its path."""
        path = path or os.path.join(self.dir, "lab.toml")
        with open(path, "w") as f:
            f.write(self.hosts_toml())
        return path

    def exec(self, role: str, cmd: str) -> str:
        """A command on a host as its SSH sessions see it (its network and mount namespaces), from
        here, not over SSH: what the tests check with."""
        p = subprocess.run(["nsenter", "-t", str(self.sshd[role].pid), "-m", "-n", "sh", "-c", cmd],
                           capture_output=True, text=True, timeout=30)
        return p.stdout + p.stderr

    def namespace_pids(self, role: str) -> list[int]:
        """Every process in a host's network namespace (sshd's included)."""
        p = subprocess.run(["ip", "netns", "pids", self.ns[role]], capture_output=True, text=True, timeout=10)
        return [int(x) for x in p.stdout.split()]

    # -- tear-down -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every sshd and every process left in the namespaces; remove links, namespaces, files."""
        for p in self.sshd.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.sshd.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        for ns in self.made:
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                                      timeout=10).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass                                           # exited meanwhile
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made = []
        for k in range(len(ROLES)):
            subprocess.run(["ip", "link", "del", f"rm{k + 1}{self.tag}"], capture_output=True, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "SSHRig":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
