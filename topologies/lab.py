"""A remote testbed: the machines of a hosts file (topologies.hostsfile), driven over SSH.

    lab = RemoteLab(hostsfile.load("lab.toml"))
    lab.open(needs)        # connect to every host, preflight (one table per host), install the wheel
    with RemoteTestbed(lab, PaperTopo()) as tb:   # (topologies.remotebed) the names of topologies.testbed.Testbed
        tb.client.cmd("ping -c1 " + tb.server_ip)
    lab.close()            # every host as it was: processes, endpoints, routes, sysctls, cgroups

A figure module does not know which testbed it runs on: experiments.common.testbed() gives it this
one under `--hosts`. The links are the hosts' own interfaces, unshaped (the paper's regime for
Fig. 4, Fig. 5 and Table 1); a figure that shapes its links is refused with the reason.
"""
from __future__ import annotations

import hashlib
import io
import re
import shlex
import subprocess
import sys
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from topologies.hostsfile import Lab
from topologies.remote import RemoteError, RemoteHost

ROOT = Path(__file__).resolve().parent.parent
PEERS = {"client": ("wrk", "iperf3"), "converter": ("haproxy", "squid", "nginx"), "server": ("nginx", "iperf3")}
PIP = "pip==23.0.1"   # installs the wheels into each host's venv (Debian 12's own pip)
SYSTEM_PYTHON = "/usr/bin/python3"   # each host's venv is made from it, with its Debian packages visible


class LabRefused(RuntimeError):
    """A host cannot take part (SSH refused, no MPTCP, a port taken, a tool missing): one line per
    host and cause; nothing was started anywhere."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class Needs:
    """What a run needs of each host: tools by role and ports that must be free."""
    tools: dict[str, list[str]] = field(default_factory=lambda: {
        "client": ["wrk", "iperf3", "ping", "taskset", "ip", "ss"],
        "converter": ["haproxy", "squid", "nginx", "tcpdump", "taskset", "ip", "ss", "nstat", "ethtool"],
        "server": ["nginx", "iperf3", "taskset", "ip", "ss"]})
    ports: dict[str, list[int]] = field(default_factory=lambda: {
        "converter": list(range(17000, 17040)), "server": [80, 81, 5201, 9500]})


class RemoteLab:
    """The hosts of a hosts file, connected, checked and installed; see the module's docstring."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.hosts: dict[str, RemoteHost] = {}
        self.preflight_rows: dict[str, list[tuple[str, bool, str]]] = {}

    # -- connect, check, install -----------------------------------------------------------------
    def open(self, needs: Needs | None = None, install: bool = True, out=sys.stdout) -> "RemoteLab":
        """Connect, preflight, install; raises LabRefused (every connection closed) if a host cannot."""
        try:
            self._connect()
            self.preflight(needs or Needs(), out)
            if install:
                self.install(out)
        except BaseException:
            self.close()
            raise
        return self

    def _connect(self) -> None:
        problems = []
        for role, spec in self.lab.hosts.items():
            host = RemoteHost(spec)
            try:
                host.connect()
                self.hosts[role] = host
            except Exception as e:  # noqa: BLE001 - paramiko raises many kinds; each is one line
                problems.append(f"{role} ({spec.target}): SSH refused: {type(e).__name__}: {e}")
        if problems:
            raise LabRefused(problems)

    def _parallel(self, fn) -> dict:
        """fn(role, host) on every host at once; {role: result}; the first exception re-raised."""
        results, errors = {}, {}

        def one(role, host):
            try:
                results[role] = fn(role, host)
            except BaseException as e:  # noqa: BLE001 - re-raised below, in this thread
                errors[role] = e
        threads = [threading.Thread(target=one, args=item) for item in self.hosts.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise next(iter(errors.values()))
        return results

    def preflight(self, needs: Needs, out=sys.stdout) -> None:
        """What `mimbox doctor --testbed` checks, on each host over SSH; one table per host; raises
        LabRefused naming each host and cause."""
        def check(role, host):
            # Debian's python3 (the converter's seccomp binding is its package python3-seccomp)
            mods = "venv, seccomp" if role == "converter" else "venv"
            ends = [(p.intf_mbox, p.mbox_if) if role == "converter" else (p.intf_outer, p.outer_if)
                    for p in (self.lab.client_paths if role in ("client", "converter") else [])
                    + (self.lab.server_paths if role in ("server", "converter") else [])]
            tools = needs.tools.get(role, [])
            probes = {"uid": "id -u", "mptcp": "sysctl -n net.mptcp.enabled",
                      "python": f"{SYSTEM_PYTHON} -c 'import sys, {mods}; print(sys.version.split()[0])' 2>&1 | tail -1",
                      "listening": "ss -Hltn",
                      **{f"tool {t}": f"command -v {shlex.quote(t)}" for t in tools},
                      **{f"addr {i}": f"ip -o -4 addr show dev {shlex.quote(i)}" for i, _ in ends}}
            got = host.probe(probes)                        # one round trip for every check of the host
            rows = [("root or sudo", got["uid"] == "0", "root" + (" (sudo)" if host.spec.sudo else "")
                     if got["uid"] == "0" else f"uid {got['uid']}" + (", sudo refused" if host.spec.sudo else "")),
                    ("MPTCP enabled", got["mptcp"] == "1", f"net.mptcp.enabled = {got['mptcp'] or '?'}"),
                    (f"{SYSTEM_PYTHON} ({mods})", bool(re.fullmatch(r"3\.(1[1-9]|[2-9]\d)\.\d+", got["python"])),
                     got["python"] or "missing")]
            rows += [(f"tool {t}", bool(got[f"tool {t}"]), got[f"tool {t}"] or "missing") for t in tools]
            for intf, addr in ends:
                have = got[f"addr {intf}"] + " "
                rows.append((f"{intf} {addr}", f" {addr} " in have, "present" if f" {addr} " in have
                             else (have.strip().splitlines() or ["not on the interface"])[0][:60]))
            ports = needs.ports.get(role, [])
            if ports:
                taken = [line.split()[3].rsplit(":", 1)[1] for line in got["listening"].splitlines()
                         if len(line.split()) > 3]
                busy = sorted({int(p) for p in taken if p.isdigit()} & set(ports))
                rows.append((f"ports {ports[0]}" + (f"-{ports[-1]}" if len(ports) > 1 else ""), not busy,
                             "free" if not busy else f"taken: {', '.join(map(str, busy))}"))
            return rows
        self.preflight_rows = self._parallel(check)
        problems = []
        for role in self.hosts:
            rows = self.preflight_rows[role]
            print(f"{role} ({self.hosts[role].spec.target})", file=out)
            for name, ok, detail in rows:
                print(f"  {name:<28} {'OK' if ok else 'FAIL':<5} {detail}", file=out)
                if not ok:
                    problems.append(f"{role} ({self.hosts[role].spec.target}): {name}: {detail}")
        if problems:
            raise LabRefused(problems)

    def install(self, out=sys.stdout) -> None:
        """The wheel built here (and its pinned dependencies, as wheels: no host needs an index) in a
        venv of its own on every host, and this checkout's experiments/ and topologies/ beside it.
        A host that has this exact set already keeps it."""
        wheels = build_wheelhouse()
        pip = next(p for p in wheels if p.name.startswith("pip-"))   # runs from its wheel: no ensurepip
        src = _source_tarball()
        stamp = hashlib.sha1(b"".join(p.read_bytes() for p in wheels) + src).hexdigest()[:16]

        def one(role, host):
            w = shlex.quote(host.workdir)
            if host.cmd(f"cat {w}/installed 2>/dev/null").strip() != stamp:
                host.run(f"rm -rf {w}/venv {w}/wheels {w}/src && mkdir -p {w}/wheels {w}/src {w}/run")
                for p in wheels:
                    host.put(str(p), f"{host.workdir}/wheels/{p.name}")
                host.write_file(f"{host.workdir}/src.tar", src)
                host.run(f"tar -xf {w}/src.tar -C {w}/src && rm {w}/src.tar && {SYSTEM_PYTHON} -m venv --without-pip --system-site-packages {w}/venv && "
                         f"{w}/venv/bin/python {w}/wheels/{pip.name}/pip install -q --no-index --disable-pip-version-check "
                         f"--find-links {w}/wheels mimbox && echo {stamp} > {w}/installed", timeout=600)
                print(f"{role}: installed the wheel into {host.workdir}/venv", file=out)
            host.mptcpize = host.run(f"{host.python} -c 'from mimbox.paths import MPTCPIZE; print(MPTCPIZE)'").strip()
            if role == "converter":
                doctor = host.cmd(f"{host.python} -m mimbox.ops.cli doctor")
                if "MISSING " in doctor.replace("MISSING (optional)", ""):
                    missing = [line.split()[0] for line in doctor.splitlines()
                               if " MISSING " in line and "(optional)" not in line]
                    raise LabRefused([f"converter ({host.spec.target}): mimbox doctor: missing {', '.join(missing)}"])
        self._parallel(one)

    def facts(self) -> dict:
        """Every host's facts for the manifest: kernel, CPU, cores, and each data interface's NIC
        driver and firmware, offloads, speed and MTU."""
        def one(role, host):
            intfs = sorted({p.intf_mbox if role == "converter" else p.intf_outer
                            for p in self.lab.client_paths + self.lab.server_paths
                            if role == "converter" or (role == "client") == (p in self.lab.client_paths)})
            offloads = ("tcp-segmentation-offload", "generic-segmentation-offload", "generic-receive-offload",
                        "large-receive-offload")
            got = host.probe({"kernel": "uname -r", "cores": "nproc",
                              "cpu": "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-",
                              "idle": "cat /sys/devices/system/cpu/cpuidle/current_driver || echo none",
                              **{f"{i} {k}": c for i in intfs for k, c in (
                                  ("ethtool", f"ethtool -i {i}"), ("offloads", f"ethtool -k {i}"),
                                  ("speed", f"cat /sys/class/net/{i}/speed"), ("mtu", f"cat /sys/class/net/{i}/mtu"))},
                              **{f"version {t}": f"{t} -v 2>&1 | head -1" for t in PEERS.get(role, ())}})
            kernel, cores, cpu, idle = got["kernel"], got["cores"], got["cpu"], got["idle"]
            nics = {}
            for i in intfs:
                drv = dict(x.split(": ", 1) for x in got[f"{i} ethtool"].splitlines() if ": " in x)
                offl = dict(x.split(": ", 1) for x in got[f"{i} offloads"].splitlines() if ": " in x)
                nics[i] = {"driver": drv.get("driver", "?"), "firmware": drv.get("firmware-version", "?"),
                           "speed_mbps": got[f"{i} speed"] if got[f"{i} speed"].lstrip("-").isdigit() else "?",
                           "mtu": got[f"{i} mtu"], "offloads": {k: offl.get(k, "?").split()[0] for k in offloads}}
            versions = {t: got[f"version {t}"] if got[f"version {t}"] and "not found" not in got[f"version {t}"]
                        else "not found" for t in PEERS.get(role, ())}
            return {"ssh": host.spec.target, "kernel": kernel, "cores": cores, "cpu": cpu.strip(),
                    "cpuidle": idle, "pinned_to": host.spec.cpus, "interfaces": nics, "versions": versions}
        return self._parallel(one)

    def cpu_ticks(self) -> dict:
        """Every host's (steal, all) CPU ticks (steal per host: experiments.common.run_experiment)."""
        return self._parallel(lambda role, host: host.cpu_ticks())

    def close(self) -> None:
        """Every host as it was before open(): processes, undo lists, run directories; connections closed."""
        errors = []
        for role, host in self.hosts.items():
            try:
                host.close()
            except Exception as e:  # noqa: BLE001 - every host is cleaned even if one fails
                errors.append(f"{role}: {e}")
        self.hosts = {}
        if errors:
            raise RemoteError("cleanup: " + "; ".join(errors))


def build_wheelhouse() -> list[Path]:
    """The converter's wheel (built here, as `./mimbox.sh wheel`) and its pinned dependencies as
    wheels, in build/wheelhouse/ (kept while pyproject.toml and the sources are unchanged)."""
    import tomllib
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    digest = hashlib.sha1(PIP.encode())
    for p in sorted([ROOT / "pyproject.toml", ROOT / "setup.py", *ROOT.glob("mimbox/**/*"), *ROOT.glob("native/**/*")]):
        if p.is_file() and "__pycache__" not in p.parts:
            digest.update(str(p.relative_to(ROOT)).encode() + p.read_bytes())
    house = ROOT / "build" / "wheelhouse" / digest.hexdigest()[:12]
    if not (house / "complete").exists():
        import shutil
        shutil.rmtree(house.parent, ignore_errors=True)
        house.mkdir(parents=True)
        for argv in ([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(house),
                      str(ROOT)],
                     [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(house), *deps, PIP]):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=ROOT)
            if p.returncode:
                raise RuntimeError(f"building the wheelhouse: {' '.join(argv[:6])}...: {p.stderr[-1500:]}")
        (house / "complete").write_text("")
    return sorted(house.glob("*.whl"))


def _source_tarball() -> bytes:
    """experiments/ and topologies/ of this checkout (what runs on the hosts besides the wheel)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for top in ("experiments", "topologies"):
            for p in sorted((ROOT / top).rglob("*.py")):
                if "__pycache__" not in p.parts:
                    info = tar.gettarinfo(str(p), arcname=str(p.relative_to(ROOT)))
                    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                    with open(p, "rb") as f:
                        tar.addfile(info, f)
    return buf.getvalue()
