"""Client side of explicit redirection: run an unchanged program with its TCP connections sent to
the converter and the real destination carried in DST_OPT (mimbox/bpf/dstopt_client.bpf.c).

The programs are attached to a cgroup made for this one command, so nothing else on the host is
touched; the cgroup, the pinned programs and maps are removed when the command ends, also on
errors and Ctrl-C. `mptcp=True` adds the LD_PRELOAD shim that makes the program's sockets MPTCP.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from mimbox.host.kernel import BPFFS, ensure_mounts
from mimbox.paths import BPF_CLIENT_OBJ, MPTCPIZE
from mimbox.wire import addrs


def _bpftool(*args: str) -> None:
    p = subprocess.run(["bpftool", *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"bpftool {' '.join(args)}: {(p.stderr or p.stdout).strip()}")


def _hex(b: bytes) -> list[str]:
    return ["hex", *(f"{x:02x}" for x in b)]


PROGRAMS = (("connect4", "mimbox_connect4"), ("connect6", "mimbox_connect6"), ("sock_ops", "mimbox_sockops"))


class ClientRedirect:
    """A cgroup whose TCP connections go to the converter `via` with DST_OPT in their SYN.

    `via`: the converter's (address, port); `via6`: its IPv6 address too when `via` is IPv4 (same
    port). IPv4 sockets go to its IPv4 address, IPv6 sockets to its IPv6 address or, lacking one, to
    ::ffff: its IPv4 address; an IPv4 socket's connect() fails (EPERM) when it has no IPv4 address."""

    def __init__(self, via: tuple[str, int], skip: tuple[str, ...] = (), obj: Path = BPF_CLIENT_OBJ,
                 via6: str | None = None):
        self.via, self.skip, self.obj = via, skip, obj
        ip = ipaddress.ip_address(via[0])
        self.via4 = str(ip) if ip.version == 4 else None
        self.via6 = via6 or (str(ip) if ip.version == 6 else None)
        self.nofit = 0          # SYNs sent without DST_OPT for lack of option room (read at exit)
        ident = f"mimbox-client-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        root = ensure_mounts()
        self.cgroup = Path(root) / ident
        self.pins = Path(BPFFS) / ident
        self.attached: list[str] = []

    def __enter__(self) -> "ClientRedirect":
        if not self.obj.exists():
            raise RuntimeError(f"{self.obj} is not built: run `invoke build`")
        remove_stale_groups(self.cgroup.parent)
        try:
            self.cgroup.mkdir()
            self.pins.mkdir()
            _bpftool("prog", "loadall", str(self.obj), str(self.pins / "progs"),
                     "pinmaps", str(self.pins / "maps"))
            # struct mimbox_cfg: converter IPv4 address (or 0) and port, the cgroup's id (its inode on
            # cgroup2), the address IPv6 sockets go to
            addr4 = ipaddress.IPv4Address(self.via4).packed if self.via4 else bytes(4)
            cfg = addr4 + self.via[1].to_bytes(2, "big") + b"\0\0" + \
                os.stat(self.cgroup).st_ino.to_bytes(8, sys.byteorder) + addrs.packed(self.via6 or self.via4)
            _bpftool("map", "update", "pinned", str(self.pins / "maps" / "mimbox_cfg"),
                     "key", *_hex(b"\0\0\0\0"), "value", *_hex(cfg))
            for a in self.skip:
                _bpftool("map", "update", "pinned", str(self.pins / "maps" / "mimbox_skip"),
                         "key", *_hex(addrs.packed(a)), "value", *_hex(b"\1"))
            for kind, prog in PROGRAMS:
                _bpftool("cgroup", "attach", str(self.cgroup), kind, "pinned", str(self.pins / "progs" / prog))
                self.attached.append(kind)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._kill_members()
        self.nofit = self._count("mimbox_nofit")
        for kind, prog in PROGRAMS:
            if kind in self.attached:
                subprocess.run(["bpftool", "cgroup", "detach", str(self.cgroup), kind, "pinned",
                                str(self.pins / "progs" / prog)], capture_output=True)
        self.attached.clear()
        shutil.rmtree(self.pins, ignore_errors=True)
        # killed members leave the group only once they have exited: retry for a moment
        for _ in range(100):
            try:
                self.cgroup.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)

    def _count(self, name: str) -> int:
        """Counter [0] of a pinned per-CPU-free array map (0 if it cannot be read)."""
        p = subprocess.run(["bpftool", "-j", "map", "lookup", "pinned", str(self.pins / "maps" / name),
                            "key", *_hex(bytes(4))], capture_output=True, text=True)
        try:
            return int.from_bytes(bytes(int(b, 16) for b in json.loads(p.stdout)["value"]), sys.byteorder)
        except (ValueError, KeyError, TypeError):
            return 0

    def _kill_members(self) -> None:
        procs = self.cgroup / "cgroup.procs"
        if not procs.exists():
            return
        for line in procs.read_text().split():
            try:
                os.kill(int(line), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def popen(self, cmd: list[str], mptcp: bool = False, **kw) -> subprocess.Popen:
        """Start `cmd` inside the cgroup (it joins before exec, so its first connect is covered)."""
        env = dict(kw.pop("env", None) or os.environ)
        if mptcp:
            env["LD_PRELOAD"] = " ".join(x for x in (str(MPTCPIZE), env.get("LD_PRELOAD", "")) if x)
        procs = str(self.cgroup / "cgroup.procs")

        def join_cgroup():
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        return subprocess.Popen(cmd, env=env, preexec_fn=join_cgroup, **kw)


def remove_stale_groups(root: Path) -> None:
    """Empty cgroups of `mimbox client` runs that were killed (SIGKILL leaves them behind)."""
    for d in root.glob("mimbox-client-*"):
        pid = d.name.split("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            try:
                d.rmdir()
            except OSError:
                pass      # still has members, or gone meanwhile


NOFIT_HINT = ("an IPv6 destination's DST_OPT takes 22 bytes and a SYN with TCP timestamps has 16 (MPTCP) or 20 "
              "left: sysctl -w net.ipv4.tcp_timestamps=0 on this host (mimbox/wire/dstopt.py)")


def run_redirected(via: tuple[str, int], cmd: list[str], mptcp: bool = False, skip: tuple[str, ...] = (),
                   via6: str | None = None) -> int:
    """`mimbox client`: run cmd redirected through the converter; return its exit code."""
    cr = ClientRedirect(via, skip, via6=via6)
    with cr:
        # we wait for the program and then remove the cgroup and programs
        rc = _wait_passing_signals(cr.popen(cmd, mptcp=mptcp))
    if cr.nofit:
        print(f"mimbox client: {cr.nofit} SYN(s) went without DST_OPT for lack of option room "
              f"(the converter refused them): {NOFIT_HINT}", file=sys.stderr)
    return rc


def _wait_passing_signals(p: subprocess.Popen) -> int:
    """Wait for the program; SIGTERM and Ctrl-C are passed on to it, not acted on here."""
    signal.signal(signal.SIGTERM, lambda *_: p.send_signal(signal.SIGTERM))
    try:
        return p.wait()
    except KeyboardInterrupt:
        p.send_signal(signal.SIGINT)
        return p.wait()


def run_converted(via: tuple[str, int], cmd: list[str], mptcp: bool = False, skip: tuple[str, ...] = (),
                  fastopen: bool = True, via6: str | None = None) -> int:
    """`mimbox client --convert`: run cmd with its connections sent through an RFC 8803 converter
    (native/convertize.c: connect() becomes a TFO SYN carrying a Convert message; the converter's
    answer is taken off the stream before the program reads); return its exit code.

    The client side of TCP Fast Open must be on (net.ipv4.tcp_fastopen bit 1, Linux's default)."""
    from mimbox.paths import CONVERTIZE
    if not CONVERTIZE.exists():
        raise RuntimeError(f"{CONVERTIZE} is not built: run `invoke build`")
    with open("/proc/sys/net/ipv4/tcp_fastopen") as f:
        if fastopen and not int(f.read()) & 1:
            raise RuntimeError("TCP Fast Open is off for clients here: sysctl -w net.ipv4.tcp_fastopen=1 "
                               "(or --no-fastopen)")
    from mimbox.config import hostport
    env = dict(os.environ, MIMBOX_CONVERT_VIA=hostport(*via), MIMBOX_CONVERT_SKIP=",".join(skip),
               MIMBOX_CONVERT_FASTOPEN="1" if fastopen else "0")
    if via6:
        env["MIMBOX_CONVERT_VIA6"] = hostport(via6, via[1])
    preload = [str(CONVERTIZE), *([str(MPTCPIZE)] if mptcp else []), env.get("LD_PRELOAD", "")]
    env["LD_PRELOAD"] = " ".join(x for x in preload if x)
    return _wait_passing_signals(subprocess.Popen(cmd, env=env))
