"""The converter's configuration: one dataclass per concern, built once from the command line."""
from __future__ import annotations

import dataclasses
import ipaddress
import math
from dataclasses import dataclass, field

from mimbox.codes import ENGINES, MAX_SOURCES, MAX_WORKERS, SPARE_MAX, SYN_PATHS

MODES = ("explicit", "transparent", "static", "convert")
CONVERT_COMPAT = ("rfc", "draft")
LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_hostport(text: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """'10.0.0.1:80' / '[2001:db8::1]:80' / ':80' / '80' -> (host, port), the host an IPv4 or IPv6
    address ('[::]:7000' listens on both families); raise ValueError on anything else."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [2001:db8::1]:80")
    else:
        host = host or default_host
        ipaddress.ip_address(host)
    p = int(port)
    if not 0 < p < 65536:
        raise ValueError(f"port {p} out of range")
    return host, p


def hostport(host: str, port: int) -> str:
    """(host, port) as written for people and parse_hostport: 10.0.0.1:80, [2001:db8::1]:80."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def config_key(name: str) -> str:
    """The config file's key of a field name ('pending_limit' -> 'listener.pending_limit'), or the
    name itself when no table declares it."""
    for table, cls in TABLES.items():
        if name in {f.name for f in dataclasses.fields(cls)}:
            return f"{table}.{name}"
    return name


def _unfinite(obj, prefix: str = "") -> list[tuple[str, str]]:
    """Every float of a config (and its tables) that is NaN or infinite, as (key, message)."""
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            out += _unfinite(v, f"{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            out.append((prefix + f.name, f"{f.name} must be a finite number, not {v!r}"))
    return out


def parse_size(text: str | int | None) -> int | None:
    """'64K' / '1M' / '2G' / '65536' -> bytes."""
    if text is None or isinstance(text, int):
        return text
    t = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t.rstrip("KMG")) * mult)


@dataclass(frozen=True)
class ListenerConfig:
    """Where clients reach the converter, and how connections are redirected."""
    addr: str = "0.0.0.0"
    port: int = 7000
    mode: str = "explicit"
    upstream: tuple[str, int] | None = None      # static mode
    intercept_ports: tuple[int, ...] = ()        # transparent mode: TCP destination ports taken over
    intercept_from: tuple[str, ...] = ()         # transparent mode: only these client prefixes
    client_mptcp: bool = True                    # listen with IPPROTO_MPTCP (TCP clients fall back)
    server_mptcp: bool = True                    # connect with IPPROTO_MPTCP (TCP servers fall back)
    queue_num: int = 4200                        # NFQUEUE that holds SYNs until the server answers
    syn_path: str = "auto"                       # hold | accept | auto (see docs/running.md "SYN path"; native/core/admit.c core_gate)
    pending_limit: int = 256                     # SYNs held at once (per worker) ...
    pending_per_prefix: int = 64                 # ... and from one client /24 or /64 ...
    pending_per_address: int = 32                # ... and from one client address
    hold_rate: int = 100                         # auto: SYNs/s per client /24 (per worker) sent to be held
    spare_sockets: int = 4                       # server sockets made ahead while idle, per kind (TCP, MPTCP)
    source_addresses: tuple[str, ...] = ()       # server connections come from these, in turn (empty: the route's)
    busy_poll_us: int = 0                        # poll, not sleep, this long after the last event (0: sleep)
    backlog: int = 4096
    health_port: int | None = None               # a TCP port that accepts while the converter serves
    convert_cookie: bytes | None = None          # convert mode: clients must send this Cookie TLV
    convert_compat: str = "rfc"                  # convert mode: answers' header field (mimbox.wire.rfc8803.HEADER_FIELD)
    syn_recorder: bool = True                    # explicit: the tc BPF recorder reads SYNs not queued


@dataclass(frozen=True)
class BufferConfig:
    """Per-side socket buffer caps (the paper's tcp_rmem/tcp_wmem experiment) and pipes."""
    client_rcvbuf: int | None = None
    client_sndbuf: int | None = None
    server_rcvbuf: int | None = None
    server_sndbuf: int | None = None
    pipe_size: int = 64 << 10
    engine: str = "auto"                     # copy a direction's first 256 KB, then splice
    uring_buffers: int = 1024                # engine uring: the worker's pool of provided buffers


@dataclass(frozen=True)
class SafetyConfig:
    """Who may use the converter and where it may go (explicit mode must not be an open relay)."""
    allow_clients: tuple[str, ...] = ()   # empty: the converter's own connected subnets
    deny_dst: tuple[str, ...] = ()        # PREFIX[:PORTS] refused (mimbox.converter.safety's rule order)
    allow_dst: tuple[str, ...] = ()       # PREFIX[:PORTS] allowed beyond public unicast
    memory_budget: int | None = None      # None: half of the host's (or cgroup's) memory (mimbox.host.resources)
    max_connections: int | None = None    # None: memory_budget over what a connection holds at rest
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    handshake_timeout: float = 15.0       # SYN released, client never completed: close the server side
    silence_timeout: float = 2.0          # convert mode: connected, not a byte of its message yet: reset
    server_mptcp_retry: float = 300.0     # seconds a server seen without MPTCP gets plain TCP sockets


@dataclass(frozen=True)
class Config:
    """Everything `mimbox run` is told, from flags and a config file (mimbox.ops.configfile: a TOML file
    has a table per concern, [listener], [buffers], [safety], and these fields at its top level)."""
    listener: ListenerConfig = field(default_factory=ListenerConfig)
    buffers: BufferConfig = field(default_factory=BufferConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    stats_path: str | None = None         # unix socket for `mimbox stats`
    log_level: str = "info"
    access_log_every: int = 0             # one access-log line per N finished connections (0: off, 1: every one)
    user: str = "mimbox"                  # workers run as this user after set-up (mimbox.host.privileges); root: stay
    workers: int = 0                      # event loops; 0: one per core this process may use
    drain_timeout: float = 30.0           # on SIGTERM, seconds connections may take to finish
    metrics: str | None = None            # HOST:PORT serving /metrics (Prometheus), None: off

    def problems(self) -> list[tuple[str, str]]:
        """Every inconsistency of its own values, as (key, message); the key names the config file's
        entry. mimbox.converter.validation adds the destination rules' and the core layout's."""
        out: list[tuple[str, str]] = []
        lc = self.listener
        if lc.mode not in MODES:
            out.append(("listener.mode", f"mode must be one of {MODES}, not {lc.mode!r}"))
        if lc.mode == "static" and not lc.upstream:
            out.append(("listener.upstream", "static mode needs an upstream (--upstream HOST:PORT)"))
        if lc.mode == "transparent" and not lc.intercept_ports:
            out.append(("listener.intercept_ports", "transparent mode needs ports to intercept (--intercept PORT[,PORT...])"))
        if self.buffers.engine not in ENGINES:
            out.append(("buffers.engine", f"engine must be one of {tuple(ENGINES)}, not {self.buffers.engine!r}"))
        n = self.buffers.uring_buffers
        if not 8 <= n <= 32768 or n & (n - 1):
            out.append(("buffers.uring_buffers", f"uring buffers must be a power of two from 8 to 32768, not {n}"))
        if lc.convert_compat not in CONVERT_COMPAT:
            out.append(("listener.convert_compat", f"convert compat must be one of {CONVERT_COMPAT}, not {lc.convert_compat!r}"))
        if lc.syn_path not in SYN_PATHS:
            out.append(("listener.syn_path", f"unknown SYN path {lc.syn_path!r}: one of {tuple(SYN_PATHS)}"))
        if self.log_level not in LOG_LEVELS:
            out.append(("log_level", f"log level must be one of {LOG_LEVELS}, not {self.log_level!r}"))
        if self.access_log_every < 0:
            out.append(("access_log_every", "access log: off, on, or N (one connection in N) with N >= 1"))
        if not 0 <= self.workers <= MAX_WORKERS:
            out.append(("workers", f"workers must be 0 (one per core) .. {MAX_WORKERS}, not {self.workers}"))
        if not 0 <= lc.spare_sockets <= SPARE_MAX:
            out.append(("listener.spare_sockets", f"spare sockets must be 0..{SPARE_MAX}"))
        if len(lc.source_addresses) > MAX_SOURCES:
            out.append(("listener.source_addresses", f"at most {MAX_SOURCES} source addresses"))
        for a in lc.source_addresses:
            try:
                ip = ipaddress.ip_address(a)
            except ValueError as e:
                out.append(("listener.source_addresses", f"{a!r}: {e}"))
                continue
            if ip.is_unspecified or ip.is_multicast:
                out.append(("listener.source_addresses", f"{a}: a source address must be one of this host's"))
        if not 0 <= lc.busy_poll_us <= 10_000_000:
            out.append(("listener.busy_poll_us", "busy poll must be 0..10000000 microseconds"))
        for key in ("pending_limit", "pending_per_prefix", "pending_per_address", "hold_rate", "backlog"):
            if getattr(lc, key) < 1:
                out.append((f"listener.{key}", f"{key} must be >= 1"))
        for key in ("connect_timeout", "handshake_timeout", "silence_timeout"):
            if getattr(self.safety, key) <= 0:
                out.append((f"safety.{key}", f"{key} must be > 0 seconds"))
        for key in ("idle_timeout", "server_mptcp_retry"):
            if getattr(self.safety, key) < 0:
                out.append((f"safety.{key}", f"{key} must be >= 0 seconds (0: never)"))
        out += _unfinite(self)
        if self.safety.max_connections is not None and self.safety.max_connections < 1:
            out.append(("safety.max_connections", "max_connections must be >= 1"))
        for key, nets in (("safety.allow_clients", self.safety.allow_clients), ("listener.intercept_from", lc.intercept_from)):
            for net in nets:
                try:
                    ipaddress.ip_network(net, strict=False)
                except ValueError as e:
                    out.append((key, f"{net!r}: {e}"))
        if self.metrics is not None:
            try:
                parse_hostport(self.metrics, "127.0.0.1")
            except ValueError as e:
                out.append(("metrics", f"{self.metrics!r}: HOST:PORT or PORT ({e})"))
        return out

    def per_connection_memory(self) -> int:
        """Bytes one converted connection holds at rest (mimbox.host.resources.bytes_at_rest: its kernel
        objects by slab, the core's slot). Bytes in flight are bounded by the kernel's tcp_mem, and
        new connections are refused under its pressure (mimbox.host.resources.MemoryPressure), not reserved
        here: reserving every buffer's worst case admitted 60x fewer connections than the box holds."""
        from mimbox.host.resources import bytes_at_rest
        return bytes_at_rest()

    def memory_limit(self) -> int | None:
        """The connections the memory budget admits (None: --max-connections decides)."""
        if self.safety.max_connections is not None:
            return None
        from mimbox.host.resources import default_budget
        budget = self.safety.memory_budget if self.safety.memory_budget is not None else default_budget()
        return max(1, budget // self.per_connection_memory())

    def ports_limit(self) -> int | None:
        """Static mode: the connections its one upstream can take, a local port each from every source
        address (mimbox.host.resources.local_ports); None in the other modes (a port a destination)."""
        if self.listener.mode != "static" or not self.listener.upstream:
            return None
        from mimbox.host.resources import local_ports
        return local_ports() * max(1, self.upstream_sources())

    def upstream_sources(self) -> int:
        """Static mode: the source addresses of the upstream's family (0: the route's address)."""
        up = self.listener.upstream
        return sum((":" in a) == (":" in up[0]) for a in self.listener.source_addresses) if up else 0

    def connection_limit(self) -> int:
        """The global limit: explicit, or the memory budget over what a connection holds at rest (in
        static mode, at most what the upstream's local ports take)."""
        if self.safety.max_connections is not None:
            return self.safety.max_connections
        ports = self.ports_limit()
        return self.memory_limit() if ports is None else min(self.memory_limit(), ports)


# the config file's tables (mimbox.ops.configfile), each one dataclass
TABLES = {"listener": ListenerConfig, "buffers": BufferConfig, "safety": SafetyConfig}

# What SIGHUP may change in a running converter: new connections get it, established ones carry on.
# Anything else (where it listens, its mode, workers, rules and queues, buffers) needs a restart.
RELOADABLE = {
    "safety.allow_clients", "safety.deny_dst", "safety.allow_dst", "safety.memory_budget",
    "safety.max_connections", "safety.connect_timeout", "safety.idle_timeout", "safety.handshake_timeout",
    "safety.server_mptcp_retry", "listener.pending_limit", "listener.pending_per_prefix",
    "listener.pending_per_address", "safety.silence_timeout",
    "listener.convert_cookie", "log_level", "access_log_every", "drain_timeout",
}


def flatten(cfg: Config) -> dict[str, object]:
    """{'table.key' or 'key': value} of every field of `cfg`."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name in TABLES:
            out.update({f"{f.name}.{g.name}": getattr(v, g.name) for g in dataclasses.fields(v)})
        else:
            out[f.name] = v
    return out


def changes(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """(keys that changed and may change in place, keys that changed and need a restart)."""
    a, b = flatten(old), flatten(new)
    changed = sorted(k for k in a if a[k] != b[k])
    return [k for k in changed if k in RELOADABLE], [k for k in changed if k not in RELOADABLE]


def static_upstream(cfg: Config) -> tuple[str, int] | None:
    """Static mode's server (the operator named it: the policy allows it), else None."""
    lc = cfg.listener
    return (str(lc.upstream[0]).strip("[]"), lc.upstream[1]) if lc.mode == "static" and lc.upstream else None


def _addresses() -> list[tuple[str, int]]:
    """(address, prefix length) of every IPv4 and IPv6 address of this network namespace (netlink,
    pyroute2)."""
    import socket

    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return [(m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS"), m["prefixlen"])
                for family in (socket.AF_INET, socket.AF_INET6) for m in ipr.get_addr(family=family)]


def local_subnets() -> list[str]:
    """The subnets this host is directly connected to, both families (the default allowed clients):
    not loopback, not IPv6 link-local."""
    nets = [ipaddress.ip_network(f"{a.partition('%')[0]}/{n}", strict=False) for a, n in _addresses()]
    return [str(n) for n in nets if not n.is_loopback and not n.is_link_local]


def local_addresses() -> list[str]:
    """Every address of this host, both families (the converter never relays to itself)."""
    return [a.partition("%")[0] for a, _ in _addresses()]
