"""What the box really has, and what a connection really costs: the default connection limit.

A converted connection at rest holds kernel objects, not buffers: its client's MPTCP socket and
subflows, its server's TCP socket, their inodes, files and epoll entries, and the core's slot (~16 KB
here with two subflows, by /proc/slabinfo's object sizes; measured: results/concurrency). Bytes
in flight are the kernel's to bound (tcp_mem): the converter refuses new connections while the
kernel's TCP memory nears its pressure threshold, before the kernel starts to squeeze established
ones (MemoryPressure). So the default limit is the memory budget (half of what the host, or the
cgroup the converter runs in, has) over the cost at rest, and the open-file limit (two fds a
connection, per process) binds first on most hosts: the start-up line says which one binds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("mimbox")

# What one converted connection holds at rest, by kernel cache: (slab names, the largest counts; how many)
SUBFLOWS = 2                # a phone's WiFi and cellular
AT_REST = ((("MPTCP", "MPTCPv6"), 1),                  # the client's MPTCP socket
           (("TCP", "TCPv6"), SUBFLOWS + 1),           # its subflows, the server's socket
           (("sock_inode_cache",), SUBFLOWS + 2),      # a struct socket each (a subflow's is the kernel's)
           (("filp",), 2), (("dentry",), 2),           # the two fds' files
           (("eventpoll_epi",), 2))                    # the two sockets in the worker's epoll set
SUBFLOW_CONTEXT = 1024      # struct mptcp_subflow_context (kmalloc-1k), one a subflow
CORE_SLOT = 512             # struct conn and its pointer (native/core/core-t.h)
FALLBACK_AT_REST = 16 << 10  # /proc/slabinfo unreadable (not root): a safe upper bound
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: bind() an address, the port chosen at connect()
FD_RESERVE = 256            # fds beside connections and pooled pipes: listeners, queue, stats, logs


def slab_sizes(text: str) -> dict[str, int]:
    """/proc/slabinfo's object size per cache."""
    out = {}
    for line in text.splitlines()[2:]:
        f = line.split()
        if len(f) > 3 and f[3].isdigit():
            out[f[0]] = int(f[3])
    return out


_at_rest: int | None = None


def bytes_at_rest() -> int:
    """What one idle converted connection holds (kernel objects by slab size, plus the core's slot);
    read once (as root, before privileges are dropped), then kept: a reload gets the same number."""
    global _at_rest
    if _at_rest is None:
        try:
            with open("/proc/slabinfo") as f:
                sizes = slab_sizes(f.read())
        except OSError:
            sizes = {}
        if all(any(n in sizes for n in names) for names, _ in AT_REST):
            _at_rest = sum(max(sizes.get(n, 0) for n in names) * k for names, k in AT_REST) \
                + SUBFLOWS * SUBFLOW_CONTEXT + CORE_SLOT
        else:
            _at_rest = FALLBACK_AT_REST
    return _at_rest


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def memory_available() -> int:
    """Bytes this process may use: the host's MemTotal, or its memory cgroup's limit if lower."""
    with open("/proc/meminfo") as f:
        total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    limits = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    limits.append(_read_int(f"/sys/fs/cgroup{path}/memory.max"))
                elif "memory" in controllers.split(","):
                    limits.append(_read_int(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
    except OSError:
        pass                  # no cgroup file to read: no cgroup limit
    return min([total, *(x for x in limits if x)])


def default_budget() -> int:
    """The memory budget when none is given: half of what the host (or cgroup) has."""
    return memory_available() // 2


@dataclass(frozen=True)
class FdRoom:
    """What RLIMIT_NOFILE lets one process hold: `connections` (two fds each), the soft limit
    reached and the hard one (which only CAP_SYS_RESOURCE raises)."""
    connections: int
    limit: int
    hard: int
    capped: bool            # fewer than asked for: the open-file limit binds


def raise_fd_limit(connections: int, pipes: int = 0, minimum: int = 16) -> FdRoom:
    """Raise RLIMIT_NOFILE towards `connections` (two sockets each; `pipes` pooled, FD_RESERVE beside):
    as far as /proc/sys/fs/nr_open and, without CAP_SYS_RESOURCE, the hard limit allow. RuntimeError
    if fewer than `minimum` fit (a converter that would refuse nearly everyone must not start)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = 2 * pipes + FD_RESERVE
    want = 2 * connections + reserve
    ceiling = _read_int("/proc/sys/fs/nr_open") or hard
    target = min(max(want, soft), ceiling)
    for new in (target, min(target, hard)):      # above the hard limit needs CAP_SYS_RESOURCE
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, max(new, hard)))
            break
        except (ValueError, OSError):
            continue
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fit = (soft - reserve) // 2
    if fit < min(minimum, connections):
        raise RuntimeError(f"the open-file limit ({soft}) leaves room for {max(fit, 0)} connections "
                           f"(2 fds each, {reserve} reserved): raise it (ulimit -n, LimitNOFILE=) "
                           f"to at least {2 * minimum + reserve}")
    return FdRoom(max(1, fit), soft, hard, fit < connections)


def port_count(port_range: str, reserved: str) -> int:
    """Ports in net.ipv4.ip_local_port_range ('32768\t60999') that ip_local_reserved_ports
    ('5000-9999,17000') leaves to connect()."""
    low, high = (int(x) for x in port_range.split())
    taken = set()
    for part in filter(None, reserved.strip().split(",")):
        a, _, b = part.partition("-")
        taken.update(range(max(low, int(a)), min(high, int(b or a)) + 1))
    return max(0, high - low + 1 - len(taken))


def local_ports() -> int:
    """The local ports connect() picks from (this network namespace's): one server address and port
    takes at most this many connections from one source address."""
    def read(name: str, default: str) -> str:
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                return f.read()
        except OSError:
            return default
    return port_count(read("ip_local_port_range", "32768 60999"), read("ip_local_reserved_ports", ""))


def check_sources(addresses: tuple[str, ...]) -> None:
    """Every --source-address is one of this host's (a bind() to it works): RuntimeError naming the one
    that is not, at start, rather than every server connection refused later."""
    import socket
    for a in addresses:
        with socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)      # no port taken here
                s.bind((a, 0))
            except OSError as e:
                raise RuntimeError(f"source address {a}: not an address of this host ({e.strerror})") from None


def limit_line(admitted: int, memory_limit: int | None, fds: FdRoom, workers: int,
               ports_limit: int | None = None, sources: int = 0) -> str:
    """The start-up line's account of the connection limit: the number and what binds it."""
    by_fds = fds.connections * workers
    if memory_limit is None:
        return f"limit {admitted} connections (--max-connections)"
    if ports_limit is not None and ports_limit < min(by_fds, memory_limit):
        return (f"limit {ports_limit} connections (local ports bind: the upstream takes one of "
                f"{ports_limit // max(1, sources)} ports (net.ipv4.ip_local_port_range) from each of "
                f"{max(1, sources)} source address{'es' if sources > 1 else ''}; more --source-address "
                f"lift it; memory would admit {memory_limit})")
    if by_fds < memory_limit:
        return (f"limit {by_fds} connections (open files bind: {fds.limit} per process, 2 a connection, "
                f"{workers} worker{'s' if workers > 1 else ''}; memory would admit {memory_limit}: "
                f"more --workers or a higher LimitNOFILE lift it)")
    return (f"limit {memory_limit} connections (memory binds: budget / {bytes_at_rest()} B a connection "
            f"at rest; --memory-budget or --max-connections)")


# -- the kernel's TCP memory --------------------------------------------------------------------------------
ENTER, LEAVE = 0.9, 0.8     # of tcp_mem's pressure threshold: refuse from, admit again below


def tcp_memory(sockstat: str) -> int:
    """Pages the kernel's TCP sockets hold now (/proc/net/sockstat's `TCP: ... mem N`; MPTCP's
    subflows are TCP sockets, and its own memory is charged to TCP's accounting too)."""
    for line in sockstat.splitlines():
        if line.startswith("TCP:"):
            f = line.split()
            return int(f[f.index("mem") + 1])
    return 0


class MemoryPressure:
    """Watches the kernel's TCP memory against tcp_mem's pressure threshold (its second value: past it
    the kernel shrinks buffers and prunes queues of established connections). From ENTER of it, the
    shared admission's pressure flag makes every worker's core refuse new connections (cause memory
    pressure: RST, or Resource Exceeded in convert mode), logged once; below LEAVE, admitted again."""

    def __init__(self, admission, read=None):
        self.admission = admission
        self.read = read or self._read
        self.on = False

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/net/sockstat") as f:
            used = tcp_memory(f.read())
        with open("/proc/sys/net/ipv4/tcp_mem") as f:
            return used, int(f.read().split()[1])

    def check(self) -> bool:
        """Read once (a second, by the supervisor or the lone relay); True while refusing."""
        try:
            used, threshold = self.read()
        except (OSError, ValueError, IndexError):
            return self.on                 # (nothing new to go by)
        if not self.on and used >= ENTER * threshold:
            self.on = True
            log.warning("memory pressure: the kernel's TCP memory holds %d pages, %d%% of its pressure "
                        "threshold (tcp_mem %d): new connections are refused until it falls below %d%%",
                        used, 100 * used // max(threshold, 1), threshold, int(100 * LEAVE))
        elif self.on and used < LEAVE * threshold:
            self.on = False
            log.warning("memory pressure over: TCP memory %d pages; new connections admitted again", used)
        self.admission.pressure = used if self.on else 0
        return self.on
