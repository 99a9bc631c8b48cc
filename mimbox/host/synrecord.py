"""Explicit mode without holding the SYN: a tc BPF program records each client SYN's DST_OPT.

    rec = SynRecorder(port=7000).install()     # on every interface of this network namespace
    rec.pop(("10.0.1.1", 40312))               # -> ("10.0.101.1", 80) once, or None
    rec.remove()

The program (mimbox/bpf/dstopt_server.bpf.c) runs at tc ingress, in the softirq of the packet's
arrival, and only looks: the SYN goes on to the kernel, which answers it (with SYN cookies if the
backlog is full). The relay reads the destination when it accept()s the connection: one bpf()
call instead of a trip through NFQUEUE and Python for every SYN. Its map is an LRU of
`dstopt.RECORD_ENTRIES`: SYNs that never complete push out only the oldest entries.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from mimbox.paths import BPF_SERVER_OBJ
from mimbox.wire import addrs, dstopt

SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "riscv64": 280, "ppc64le": 361, "s390x": 351}
BPF_MAP_LOOKUP_ELEM, BPF_MAP_UPDATE_ELEM, BPF_OBJ_GET, BPF_MAP_LOOKUP_AND_DELETE_ELEM = 1, 2, 7, 21
PROG_NAME = "mimbox_record_dstopt"
_libc = ctypes.CDLL(None, use_errno=True)


class _ObjAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class _ElemAttr(ctypes.Structure):
    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(f"bpf() syscall number unknown on {platform.machine()}")
    r = _libc.syscall(nr, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if r < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return r


class _TestRunAttr(ctypes.Structure):
    _fields_ = [("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("data_size_in", ctypes.c_uint32),
                ("data_size_out", ctypes.c_uint32), ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
                ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
                ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32)]


BPF_PROG_TEST_RUN = 10


class BpfMap:
    """A pinned BPF map, opened by path; keys and values are bytes of the map's sizes."""

    def __init__(self, path: str | Path, key_size: int, value_size: int):
        p = ctypes.create_string_buffer(str(path).encode())
        self.fd = _bpf(BPF_OBJ_GET, _ObjAttr(ctypes.addressof(p), 0, 0))
        self.key_size, self.value_size = key_size, value_size
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = _ElemAttr(self.fd, 0, 0, ctypes.addressof(self._value), 0)

    def update(self, key: bytes, value: bytes) -> None:
        k, v = ctypes.create_string_buffer(key, self.key_size), ctypes.create_string_buffer(value, self.value_size)
        _bpf(BPF_MAP_UPDATE_ELEM, _ElemAttr(self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))

    def lookup(self, key: bytes) -> bytes | None:
        """The value under `key`; None if there is none."""
        k, v = ctypes.create_string_buffer(key, self.key_size), ctypes.create_string_buffer(self.value_size)
        try:
            _bpf(BPF_MAP_LOOKUP_ELEM, _ElemAttr(self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), 0))
        except OSError:
            return None
        return v.raw

    def pop(self, key: bytes) -> bytes | None:
        """The value under `key`, removed from the map; None if there is none."""
        k = ctypes.create_string_buffer(key, self.key_size)
        self._attr.key = ctypes.addressof(k)
        nr = SYS_BPF[platform.machine()]
        if _libc.syscall(nr, BPF_MAP_LOOKUP_AND_DELETE_ELEM, ctypes.byref(self._attr), ctypes.sizeof(self._attr)) < 0:
            return None
        return self._value.raw

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip()}")
    return p


def _clsact_marker(dev: str) -> Path:
    """The directory (bpffs holds no plain files) that says a recorder added `dev`'s clsact qdisc,
    per network namespace and device."""
    return Path("/sys/fs/bpf") / f"mimbox-clsact-{os.stat('/proc/self/ns/net').st_ino}-{dev}"


def _drop_clsact_if_unused(dev: str) -> bool:
    """Remove `dev`'s clsact qdisc if a recorder added it (its marker) and no filter is left on it
    (another recorder's, or anyone's); True if removed."""
    marker = _clsact_marker(dev)
    if not marker.exists() or any(_run("tc", "filter", "show", "dev", dev, side, check=False).stdout.strip()
                                  for side in ("ingress", "egress")):
        return False
    _run("tc", "qdisc", "del", "dev", dev, "clsact", check=False)
    marker.rmdir()
    return True


def interfaces() -> list[str]:
    """Every interface of this network namespace but loopback."""
    return [name for _, name in socket.if_nameindex() if name != "lo"]


class SynRecorder:
    """The recorder of one explicit-mode listener port; install() attaches it, remove() undoes it
    all (filters, the clsact qdiscs it added, pins). `pins`: where its program and maps live."""

    def __init__(self, port: int, obj: Path = BPF_SERVER_OBJ, devices: list[str] | None = None):
        self.port, self.obj = port, obj
        self.devices = devices
        self.pins = Path("/sys/fs/bpf") / f"mimbox-syn-{port}-{os.getpid()}"
        self.attached: list[str] = []
        self.added_clsact: list[str] = []
        self.map: BpfMap | None = None
        self.conflict_map: BpfMap | None = None

    @property
    def pref(self) -> int:
        """tc filter priority: the port, so that listeners on other ports coexist."""
        return self.port

    def install(self) -> "SynRecorder":
        """Load, configure and attach on every interface; raises RuntimeError with the reason."""
        from mimbox.host.kernel import ensure_mounts
        if not self.obj.exists():
            raise RuntimeError(f"{self.obj} is missing (run `./mimbox.sh build`)")
        ensure_mounts()
        devices = self.devices if self.devices is not None else interfaces()
        remove_leftovers(self.port, devices)
        try:
            self.pins.mkdir(parents=True)
            _run("bpftool", "prog", "load", str(self.obj), str(self.pins / "prog"), "type", "classifier",
                 "pinmaps", str(self.pins / "maps"))
            port_map = BpfMap(self.pins / "maps" / "mimbox_port", 4, 4)
            try:
                port_map.update(bytes(4), socket.htons(self.port).to_bytes(4, sys.byteorder))
            finally:
                port_map.close()
            self.map = BpfMap(self.pins / "maps" / "mimbox_syn_dst", dstopt.RECORD_KEY.size, dstopt.RECORD_VALUE_SIZE)
            self.conflict_map = BpfMap(self.pins / "maps" / "mimbox_conflicts", 4, 8)
            for dev in devices:
                if "clsact" not in _run("tc", "qdisc", "show", "dev", dev).stdout:
                    _run("tc", "qdisc", "add", "dev", dev, "clsact")
                    _clsact_marker(dev).mkdir(exist_ok=True)   # a recorder made it: the last to leave removes it
                    self.added_clsact.append(dev)
                _run("tc", "filter", "add", "dev", dev, "ingress", "pref", str(self.pref), "bpf", "direct-action",
                     "object-pinned", str(self.pins / "prog"))
                self.attached.append(dev)
        except BaseException:
            self.remove()
            raise
        return self

    def run_on(self, frame: bytes) -> int:
        """Run the loaded program on one Ethernet frame (BPF_PROG_TEST_RUN: nothing is attached or
        sent); its return code. For tests that compare it with the converter's own parser."""
        fd = _bpf(BPF_OBJ_GET, _ObjAttr(ctypes.addressof(p := ctypes.create_string_buffer(
            str(self.pins / "prog").encode())), 0, 0))
        try:
            data = ctypes.create_string_buffer(frame, len(frame))
            attr = _TestRunAttr(prog_fd=fd, data_size_in=len(frame), data_in=ctypes.addressof(data), repeat=1)
            _bpf(BPF_PROG_TEST_RUN, attr)
            return attr.retval
        finally:
            del p
            os.close(fd)

    def pop(self, client: tuple[str, int]) -> tuple[str, int] | None:
        """The destination client's SYN asked for (once), or None if none was recorded."""
        raw = self.map.pop(dstopt.RECORD_KEY.pack(addrs.packed(client[0]), client[1]))
        if raw is None:
            return None
        addr, port = dstopt.RECORD_VALUE.unpack(raw[:dstopt.RECORD_VALUE.size])
        if time.monotonic_ns() - int.from_bytes(raw[dstopt.RECORD_VALUE.size:], sys.byteorder) > dstopt.RECORD_TTL_NS:
            return None         # stale: its SYN never became a connection
        return addrs.text(addr), port

    def conflicts(self) -> int:
        """SYNs refused so far for naming another destination than their (address, port)'s first."""
        if self.conflict_map is None:
            return 0
        raw = self.conflict_map.lookup(bytes(4))
        return int.from_bytes(raw, sys.byteorder) if raw else 0

    def remove(self) -> None:
        """Detach and unpin everything install() made (idempotent)."""
        for dev in self.attached:
            _run("tc", "filter", "del", "dev", dev, "ingress", "pref", str(self.pref), check=False)
        for dev in dict.fromkeys(self.attached + self.added_clsact):
            _drop_clsact_if_unused(dev)    # the last recorder on the device, whichever added it
        self.attached, self.added_clsact = [], []
        for m in (self.map, self.conflict_map):
            if m is not None:
                m.close()
        self.map = self.conflict_map = None
        shutil.rmtree(self.pins, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                           # someone else's: alive
    return True


def remove_leftovers(port: int | None = None, devices: list[str] | None = None) -> list[str]:
    """What recorders whose converter died left (a converter killed by SIGKILL never removes its
    own): their filters (on `port`, or any) and the pins of every recorder whose process is gone,
    whatever its port. Returns what was removed."""
    done = []
    for pins in Path("/sys/fs/bpf").glob("mimbox-syn-*-*"):
        pid = pins.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(pins, ignore_errors=True)
            done.append(f"pins {pins}")
    for dev in devices if devices is not None else interfaces():
        out = _run("tc", "filter", "show", "dev", dev, "ingress", check=False).stdout
        prefs = {line.split(" pref ")[1].split()[0] for line in out.splitlines()
                 if f"name {PROG_NAME[:15]} " in line and " pref " in line}   # the kernel keeps 15 characters
        for pref in prefs:
            if port is None or pref == str(port):
                _run("tc", "filter", "del", "dev", dev, "ingress", "pref", pref, check=False)
                done.append(f"tc filter {dev} ingress pref {pref}")
        if port is None and _drop_clsact_if_unused(dev):    # a dead recorder added it
            done.append(f"tc qdisc {dev} clsact")
    return done
