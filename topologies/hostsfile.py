"""The hosts file of a remote testbed (`--hosts lab.toml`): which machines play client, converter and
server, how to reach each over SSH, and the data paths between them. Checked like the converter's
config file: every error at once, each as `FILE:LINE: key: message`.

    [defaults]                      # for every host unless it says otherwise
    user = "root"                   # or a user with password-less sudo (sudo = true)
    key = "~/.ssh/id_ed25519"
    workdir = "/var/tmp/mimbox"     # where the wheel, its venv and run files go on each host

    [client]
    ssh = "192.0.2.11"              # host, host:port or user@host:port (management network)
    cpus = "0"                      # the cores its processes are pinned to

    [converter]
    ssh = "192.0.2.12"
    cpus = "1"

    [server]
    ssh = "192.0.2.13"
    cpus = "0"

    [[client_path]]                 # the client's paths, in order: the first carries the first subflow
    client = { interface = "enp1s0f0", address = "10.0.1.1/24" }
    converter = { interface = "enp1s0f0", address = "10.0.1.2/24" }

    [[client_path]]
    client = { interface = "enp1s0f1", address = "10.0.2.1/24" }
    converter = { interface = "enp1s0f1", address = "10.0.2.2/24" }

    [[server_path]]
    server = { interface = "enp2s0f0", address = "10.0.101.1/24" }
    converter = { interface = "enp2s0f0", address = "10.0.101.2/24" }

docs/remote.md says what each host needs.
"""
from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field

ROLES = ("client", "converter", "server")
HOST_KEYS = {"ssh": str, "cpus": str, "user": str, "key": str, "port": int, "workdir": str, "sudo": bool,
             "known_hosts": bool}
DEFAULT_KEYS = {k: t for k, t in HOST_KEYS.items() if k not in ("ssh", "cpus")}
END_KEYS = {"interface": str, "address": str}
PATH_TABLES = {"client_path": ("client", "converter"), "server_path": ("server", "converter")}


class HostsFileError(ValueError):
    """Every error of a hosts file: [(key, line or None, message)], printed FILE:LINE: key: message."""

    def __init__(self, path: str, errors: list[tuple[str, int | None, str]]):
        self.path, self.errors = path, errors
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"{self.path}:{line or '?'}: {key + ': ' if key else ''}{msg}" for key, line, msg in self.errors]


@dataclass(frozen=True)
class HostSpec:
    """One machine of the testbed and how to reach it."""
    role: str
    address: str            # the SSH target's host name or address
    user: str = "root"
    port: int = 22
    key: str | None = None
    workdir: str = "/var/tmp/mimbox"
    sudo: bool = False      # commands run through `sudo -n` (the user is not root)
    cpus: str = "0"
    known_hosts: bool = True  # check the host's key against ~/.ssh/known_hosts (false: accept any)

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}:{self.port}"


@dataclass(frozen=True)
class PathAddr:
    """One data path: the outer host's (client's or server's) end and the converter's, both on one
    subnet (the same names as topologies.testbed.Addr, so experiments take either)."""
    n: int
    intf_outer: str
    intf_mbox: str
    outer_if: str           # address/prefix
    mbox_if: str

    @property
    def outer_ip(self) -> str:
        return self.outer_if.split("/")[0]

    @property
    def mbox_ip(self) -> str:
        return self.mbox_if.split("/")[0]

    @property
    def subnet(self) -> str:
        return str(ipaddress.ip_interface(self.outer_if).network)

    def outer(self, family: int = 4) -> str:
        """The outer host's address (IPv4: a remote testbed's paths are IPv4)."""
        return self.outer_ip

    def mbox(self, family: int = 4) -> str:
        """The converter's address on this path."""
        return self.mbox_ip


@dataclass(frozen=True)
class Lab:
    """A checked hosts file."""
    path: str
    hosts: dict[str, HostSpec]
    client_paths: list[PathAddr] = field(default_factory=list)
    server_paths: list[PathAddr] = field(default_factory=list)


def _locate(text: str) -> dict[str, int]:
    """'table.key', 'table.N.key' (N-th [[table]]) -> the line it is set on."""
    where: dict[str, int] = {}
    table, counts = "", {}
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        m = re.match(r"^\[\[\s*([A-Za-z0-9_.-]+)\s*\]\]", s) or re.match(r"^\[\s*([A-Za-z0-9_.-]+)\s*\]", s)
        if m:
            name = m.group(1)
            if s.startswith("[["):
                counts[name] = counts.get(name, -1) + 1
                name = f"{name}.{counts[name]}"
            table = name
            where.setdefault(table, n)
            continue
        m = re.match(r'^([A-Za-z0-9_-]+)\s*=', s)
        if m:
            where.setdefault(f"{table}.{m.group(1)}" if table else m.group(1), n)
    return where


def _parse_ssh(value: str) -> tuple[str | None, str, int | None]:
    """'user@host:port' -> (user, host, port); '[v6]:port' for IPv6."""
    user, _, rest = value.rpartition("@")
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", rest) or re.fullmatch(r"([^:\s]+)(?::(\d+))?", rest)
    if not m or not m.group(1):
        raise ValueError("not host, host:port or user@host:port")
    return user or None, m.group(1), int(m.group(2)) if m.group(2) else None


def load(path: str) -> Lab:
    """Read and check a hosts file; raises HostsFileError with every problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise HostsFileError(path, [("", None, f"cannot read: {e.strerror}")]) from None
    text = raw.decode(errors="replace")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise HostsFileError(path, [("", int(m.group(1)) if m else None, f"not TOML: {e}")]) from None
    where, errors = _locate(text), []

    def err(key: str, msg: str) -> None:
        line = where.get(key) or where.get(key.rsplit(".", 1)[0])
        errors.append((key, line, msg))

    def typed(table: str, values: dict, allowed: dict) -> dict:
        out = {}
        for k, v in values.items():
            if k not in allowed:
                err(f"{table}.{k}", f"unknown key (known: {', '.join(sorted(allowed))})")
            elif not isinstance(v, allowed[k]) or (allowed[k] is int and isinstance(v, bool)):
                err(f"{table}.{k}", f"must be {allowed[k].__name__}, not {type(v).__name__}")
            else:
                out[k] = v
        return out

    for k in doc:
        if k not in ("defaults", *ROLES, "router", *PATH_TABLES):
            err(k, f"unknown table (known: defaults, {', '.join(ROLES)}, client_path, server_path)")
    defaults = typed("defaults", doc.get("defaults", {}), DEFAULT_KEYS) if isinstance(doc.get("defaults", {}), dict) \
        else {}
    hosts = {}
    for role in ROLES:
        t = doc.get(role)
        if not isinstance(t, dict):
            err(role, f"[{role}] is missing: every testbed has a client, a converter and a server")
            continue
        v = {**defaults, **typed(role, t, HOST_KEYS)}
        if "ssh" not in v:
            err(f"{role}.ssh", "missing: the host's SSH target (host, host:port or user@host:port)")
            continue
        try:
            user, address, port = _parse_ssh(v.pop("ssh"))
        except ValueError as e:
            err(f"{role}.ssh", str(e))
            continue
        if user:
            v["user"] = user
        if port:
            v["port"] = port
        if "cpus" in v and not re.fullmatch(r"\d+([-,]\d+)*", v["cpus"]):
            err(f"{role}.cpus", f"{v['cpus']!r} is not a CPU list like 0 or 2-3 or 0,2")
        if "key" in v:
            v["key"] = os.path.expanduser(v["key"])
            if not os.path.isfile(v["key"]):
                err(f"{role}.key" if "key" in t else "defaults.key", f"no such key file: {v['key']}")
        if "workdir" in v and not v["workdir"].startswith("/"):
            err(f"{role}.workdir" if "workdir" in t else "defaults.workdir", "must be an absolute path")
        hosts[role] = HostSpec(role=role, address=address, **v)
    if "router" in doc:
        err("router", "a separate router host is not supported yet: the converter host forwards (router baseline)")
    paths: dict[str, list[PathAddr]] = {}
    for table, (outer, inner) in PATH_TABLES.items():
        entries = doc.get(table, [])
        if not isinstance(entries, list) or not entries:
            err(table, f"at least one [[{table}]] is needed")
            continue
        base = 1 if table == "client_path" else 101
        paths[table] = []
        for i, e in enumerate(entries):
            key = f"{table}.{i}"
            ends = {}
            for side in (outer, inner):
                end = e.get(side)
                if not isinstance(end, dict):
                    err(f"{key}.{side}" if side in e else key, f"missing: {side} = {{ interface = ..., address = ... }}")
                    continue
                end = typed(f"{key}.{side}", end, END_KEYS)
                if set(end) != set(END_KEYS):
                    err(f"{key}.{side}", "needs both interface and address")
                    continue
                try:
                    ip = ipaddress.ip_interface(end["address"])
                except ValueError:
                    err(f"{key}.{side}", f"{end['address']!r} is not an address with its prefix (10.0.1.1/24)")
                    continue
                if ip.version != 4 or "/" not in end["address"]:
                    err(f"{key}.{side}", f"{end['address']!r}: an IPv4 address with its prefix, like 10.0.1.1/24")
                    continue
                ends[side] = end
            for k in e:
                if k not in (outer, inner):
                    err(f"{key}.{k}", f"unknown key (known: {outer}, {inner})")
            if len(ends) == 2:
                a, b = (ipaddress.ip_interface(ends[s]["address"]) for s in (outer, inner))
                if a.network != b.network:
                    err(key, f"{a} and {b} are not on one subnet")
                paths[table].append(PathAddr(base + i, ends[outer]["interface"], ends[inner]["interface"],
                                             ends[outer]["address"], ends[inner]["address"]))
    if errors:
        raise HostsFileError(path, errors)
    return Lab(path, hosts, paths["client_path"], paths["server_path"])
