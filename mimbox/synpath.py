"""What the converter decides about a new connection, without touching a socket: unit-testable.

    Cause              why a connection was refused or reset: the stats key and the log's cause
    RefusalLog         a WARNING per refusal, at most `burst` a second, then one "N more" line
    SynGate            hold a SYN (paper: connect to the server first) or let the kernel answer it
                       (connect after accept), by how many SYNs are held, in total and per prefix
    Destinations       where deferred clients wanted to go (explicit mode), bounded, oldest out
    Admission          the connection limit, shared by workers (and the core)
    Pending            a held SYN and its server connection; PendingState: held, then released

Why a gate: holding a SYN makes the converter open a server connection before the client has
proved its address. A spoofed SYN flood then fills the pending table and the server's backlog, and
real clients are locked out. Past the caps the converter releases SYNs unheld instead: the kernel
answers them (with SYN cookies when its backlog is full), and only clients that complete their
handshake reach accept() and get a server connection.
"""
from __future__ import annotations

import enum
import logging
import socket
import time
from collections import Counter, OrderedDict


class Cause(str, enum.Enum):
    """Why a connection was refused (before accept) or reset (after)."""
    BAD_OPTION = "bad option"                   # explicit mode: no or malformed DST_OPT
    CLIENT_NOT_ALLOWED = "client not allowed"
    DESTINATION_DENIED = "destination denied"
    FD_LIMIT = "file descriptor limit"
    CONNECTION_LIMIT = "connection limit"
    PENDING_LIMIT = "pending limit"             # hold mode only: too many SYNs held
    NO_DESTINATION = "no destination"           # accepted, but its SYN's destination is unknown
    SERVER_REFUSED = "server refused"
    SERVER_UNREACHABLE = "server unreachable"
    SERVER_TIMEOUT = "server timeout"
    SERVER_ERROR = "server error"
    HANDSHAKE_TIMEOUT = "client handshake timeout"
    SHUTTING_DOWN = "converter shutting down"

    @classmethod
    def of_errno(cls, err: int) -> "Cause":
        """The cause for a failed server connection."""
        import errno
        if err == errno.ECONNREFUSED:
            return cls.SERVER_REFUSED
        if err in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN):
            return cls.SERVER_UNREACHABLE
        if err == errno.ETIMEDOUT:
            return cls.SERVER_TIMEOUT
        return cls.SERVER_ERROR


class RefusalLog:
    """Refusal lines for the log, at most `burst` per `interval` seconds; the rest are counted and
    reported in one line ("N more refusals suppressed") when the next interval starts. Counters
    elsewhere stay exact: this only limits sentences."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 1.0,
                 clock=time.monotonic):
        self.log, self.burst, self.interval, self.clock = logger, burst, interval, clock
        self.window_start = -float("inf")
        self.in_window = 0
        self.suppressed: Counter = Counter()
        self.lines = 0          # lines written (for tests and stats)

    def refused(self, cause: Cause, detail: str) -> None:
        """One refusal: `detail` names the addresses, `cause` is the counter."""
        now = self.clock()
        if now - self.window_start >= self.interval:
            self.flush()
            self.window_start, self.in_window = now, 0
        if self.in_window < self.burst:
            self.in_window += 1
            self.lines += 1
            self.log.warning("refused %s: %s", detail, cause.value)
        else:
            self.suppressed[cause] += 1

    def flush(self) -> None:
        """Write the suppressed count of the window that ended, if any."""
        if self.suppressed:
            total = sum(self.suppressed.values())
            causes = ", ".join(f"{c.value} {n}" for c, n in self.suppressed.most_common())
            self.lines += 1
            self.log.warning("%d more refusals suppressed in %gs (%s)", total, self.interval, causes)
            self.suppressed.clear()


HOLD, DEFER, REFUSE = "hold", "defer", "refuse"


class SynGate:
    """Decides per SYN that reached the converter: hold it (connect first), defer it (the kernel
    answers, the server is connected after accept), or refuse it. `mode` is --syn-path:

      hold    every SYN is held (the paper); past a cap the SYN is refused (RST)
      accept  no SYN is held
      auto    held while under both caps, deferred past either (the default; the netfilter
              rules also send only --hold-rate SYNs/s per client /24 to the converter at all)

    Caps: `limit` SYNs held in all, `per_prefix` held from one client /`prefix_len` (spoofed
    floods pick addresses in one allowed prefix)."""

    def __init__(self, mode: str = "auto", limit: int = 256, per_prefix: int = 64, prefix_len: int = 24):
        if mode not in ("auto", "hold", "accept"):
            raise ValueError(f"unknown SYN path {mode!r}")
        self.mode, self.limit, self.per_prefix = mode, limit, per_prefix
        self.mask = (0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF
        self.held = 0
        self.by_prefix: Counter = Counter()

    def decide(self, client: int) -> str:
        """HOLD, DEFER or REFUSE for a SYN from `client` (an IPv4 address as int)."""
        if self.mode == "accept":
            return DEFER
        if self.held < self.limit and self.by_prefix[client & self.mask] < self.per_prefix:
            return HOLD
        return REFUSE if self.mode == "hold" else DEFER

    def hold(self, client: int) -> None:
        """A SYN from `client` is now held."""
        self.held += 1
        self.by_prefix[client & self.mask] += 1

    def release(self, client: int) -> None:
        """A held SYN from `client` was released (to the kernel or refused)."""
        self.held -= 1
        p = client & self.mask
        self.by_prefix[p] -= 1
        if self.by_prefix[p] <= 0:
            del self.by_prefix[p]


class Destinations:
    """Where deferred clients asked to go (DST_OPT of their SYN), by (address, port): looked up at
    accept(). Bounded: a flood of SYNs that never complete pushes out only the oldest entries."""

    def __init__(self, size: int = 65536, ttl: float = 30.0):
        self.size, self.ttl = size, ttl
        self.entries: OrderedDict = OrderedDict()

    def remember(self, client: tuple[str, int], dst: tuple[str, int], now: float) -> None:
        self.entries.pop(client, None)
        self.entries[client] = (dst, now)
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def take(self, client: tuple[str, int], now: float) -> tuple[str, int] | None:
        """The destination of `client`'s SYN (once), or None if unknown or older than ttl."""
        e = self.entries.pop(client, None)
        if e is None or now - e[1] > self.ttl:
            return None
        return e[0]

    def expire(self, now: float) -> None:
        while self.entries:
            _, (_, t) = next(iter(self.entries.items()))
            if now - t <= self.ttl:
                return
            self.entries.popitem(last=False)


class Admission:
    """The connection limit. Workers share one counter in shared memory, updated by the core's atomic
    operations (mimbox.core: core_admit/core_unadmit), so the limit holds for the converter as a
    whole whichever worker a client's source port picks, and the core admits without Python."""

    def __init__(self, limit: int, shared: bool = False):
        import ctypes
        import multiprocessing
        self.limit = limit
        self.cell = multiprocessing.RawValue(ctypes.c_int64, 0) if shared else ctypes.c_int64(0)
        self._atomic = None

    def address(self) -> int:
        """Where the counter is (for the core)."""
        import ctypes
        return ctypes.addressof(self.cell)

    def _ops(self):
        if self._atomic is None:
            from mimbox import core
            try:
                self._atomic = core.lib()
            except RuntimeError:          # not built: one process only (unit tests)
                self._atomic = False
        return self._atomic

    def take(self) -> bool:
        """Admit one more connection, or say False at the limit."""
        ops = self._ops()
        if ops:
            return bool(ops.core_admit(self.address(), self.limit))
        if self.cell.value >= self.limit:
            return False
        self.cell.value += 1
        return True

    def give(self) -> None:
        """A connection admitted by take() has ended."""
        ops = self._ops()
        if ops:
            ops.core_unadmit(self.address())
        else:
            self.cell.value -= 1

    @property
    def used(self) -> int:
        return self.cell.value


class HeldSet:
    """Which clients (address, port) have their SYN held by some worker, shared by all workers
    (one slot per hash in shared memory, no lock: a slot is one 8-byte store). A worker that
    accept()s a connection whose SYN another worker may hold hands it over only if the key is here;
    the others — SYNs the kernel answered unheld — it serves itself. A collision can only make it
    hand over a connection needlessly, or serve one whose SYN another worker held (that worker's
    server connection then ends at the handshake timeout): never lose one."""

    def __init__(self, slots: int = 1 << 16):
        import multiprocessing
        self.mask = slots - 1
        if slots & self.mask:
            raise ValueError("slots must be a power of two")
        self.slots = multiprocessing.RawArray("Q", slots)

    def _slot(self, key: int) -> int:
        return ((key * 0x9E3779B97F4A7C15) >> 32) & self.mask

    @staticmethod
    def key(client: tuple[str, int]) -> int:
        import socket
        return (int.from_bytes(socket.inet_aton(client[0]), "big") << 16 | client[1]) + 1

    def add(self, client: tuple[str, int]) -> None:
        k = self.key(client)
        self.slots[self._slot(k)] = k

    def discard(self, client: tuple[str, int]) -> None:
        k = self.key(client)
        i = self._slot(k)
        if self.slots[i] == k:
            self.slots[i] = 0

    def __contains__(self, client: tuple[str, int]) -> bool:
        k = self.key(client)
        return self.slots[self._slot(k)] == k


class PendingState(enum.Enum):
    """Where a held SYN's connection is, before accept()."""
    HELD = "SYN held, connecting to the server"
    RELEASED = "server answered, SYN released, waiting for the client's handshake and accept()"


class Pending:
    """A held SYN and the server connection started for it."""
    __slots__ = ("pkt", "state", "server", "dst", "t_syn", "ready_at", "tried_mptcp", "server_mptcp", "client_ip")

    def __init__(self, pkt, server: socket.socket, dst, t_syn: float, tried_mptcp: bool, client_ip: int):
        self.pkt, self.server, self.dst, self.t_syn = pkt, server, dst, t_syn
        self.state = PendingState.HELD
        self.client_ip = client_ip
        self.ready_at = 0.0
        self.tried_mptcp = tried_mptcp
        self.server_mptcp = False

    def release(self):
        """The verdict is about to be given: returns the packet, now no longer held."""
        pkt, self.pkt, self.state = self.pkt, None, PendingState.RELEASED
        return pkt
