"""The SYN path's shared pieces on the Python side (the decisions per SYN are the core's:
native/core/synq.c and admit.c; tests/test_core.py).

    Cause              why a connection was refused or reset: the stats key and the log's cause
    RefusalLog         a WARNING per refusal, at most `burst` a second, then one "N more" line
    Admission          the connection limit, shared by workers (and the core)
    HeldSet            which clients' SYNs some worker holds (shared by workers and their cores)

Why the core gates SYNs: holding a SYN makes the converter open a server connection before the
client has proved its address. A spoofed SYN flood then fills the pending table and the server's
backlog, and real clients are locked out. Past the caps (--pending-limit, --pending-per-prefix)
the converter releases SYNs unheld instead: the kernel answers them (with SYN cookies when its
backlog is full), and only clients that complete their handshake reach accept() and get a server
connection.
"""
from __future__ import annotations

import logging
import time
from collections import Counter

from mimbox.codes import SYN_ERROR_TEXT, Cause  # noqa: F401 - Cause: re-exported (its users import it here)
from mimbox.config import hostport


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


class AccessLog:
    """One line per finished connection (`--access-log`): client, server, bytes each way, duration
    and how it ended, at most `burst` lines per `interval` seconds; past that one line per interval
    says how many were not written (the counters in `mimbox stats` stay exact)."""

    def __init__(self, logger: logging.Logger, burst: int = 100, interval: float = 1.0, clock=time.monotonic):
        self.log, self.burst, self.interval, self.clock = logger, burst, interval, clock
        self.window_start = -float("inf")
        self.in_window = 0
        self.suppressed = 0
        self.lines = 0

    def ended(self, client: tuple[str, int], server: tuple[str, int], up: int, down: int, seconds: float,
              err: int) -> None:
        now = self.clock()
        if now - self.window_start >= self.interval:
            self.flush()
            self.window_start, self.in_window = now, 0
        if self.in_window >= self.burst:
            self.suppressed += 1
            return
        self.in_window += 1
        self.lines += 1
        self.log.info("%s -> %s up %d down %d duration %.3fs end %s", hostport(*client), hostport(*server), up, down, seconds,
                      end_cause(err))

    def flush(self) -> None:
        if self.suppressed:
            self.lines += 1
            self.log.info("%d more connections ended in %gs (not logged)", self.suppressed, self.interval)
            self.suppressed = 0


def end_cause(err: int) -> str:
    """How a connection ended, for the access log (0: both sides finished their streams)."""
    import errno
    import os
    if not err:
        return "complete"
    if err == errno.ETIME:
        return "idle-timeout"
    if err == errno.ESHUTDOWN:
        return "converter-stopped"
    return "reset (" + errno.errorcode.get(err, str(err)) + ": " + os.strerror(err) + ")"


class Admission:
    """The connection limit. Workers share one counter in shared memory, updated by the core's atomic
    operations (mimbox.converter.core: core_admit/core_unadmit), so the limit holds for the converter as a
    whole whichever worker a client's source port picks, and the core admits without Python. Beside
    it, the pressure word: non-zero (the kernel's TCP memory in pages, mimbox.host.resources.MemoryPressure)
    makes every core refuse new connections (native/core/admit.c)."""

    def __init__(self, limit: int, shared: bool = False):
        import ctypes
        import multiprocessing
        self.limit = limit
        self.cells = multiprocessing.RawArray(ctypes.c_int64, 2) if shared else (ctypes.c_int64 * 2)()

    def address(self) -> int:
        """Where the counter is (for the core)."""
        import ctypes
        return ctypes.addressof(self.cells)

    @property
    def used(self) -> int:
        return self.cells[0]

    @property
    def pressure(self) -> int:
        """0, or the kernel's TCP memory (pages) while new connections are refused for it."""
        return self.cells[1]

    @pressure.setter
    def pressure(self, pages: int) -> None:
        self.cells[1] = pages


class HeldSet:
    """Which clients (address, port) have their SYN held by some worker, shared by all workers: one
    slot per hash in shared memory, written and read by the workers' cores (native/core/synq.c
    held_mark, accept.c held_elsewhere; key: (address << 16 | port) + 1), no lock: a slot is one
    8-byte store. A worker that accept()s a connection whose SYN another worker may hold hands it
    over only if the key is there; the others — SYNs the kernel answered unheld — it serves itself.
    A collision can only make it hand over a connection needlessly, or serve one whose SYN another
    worker held (that worker's server connection then ends at the handshake timeout): never lose one."""

    def __init__(self, slots: int = 1 << 16):
        import multiprocessing
        self.mask = slots - 1
        if slots & self.mask:
            raise ValueError("slots must be a power of two")
        self.slots = multiprocessing.RawArray("Q", slots)

def refusal_reason(cause: Cause, detail: int, arg: int, err: int, client: str, dst: tuple[str, int], policy) -> str:
    """The log line's reason for a refusal the core decided (it sends codes, not sentences): its
    cause, detail (SYN_* for a bad option, the rule for a denied destination: `policy` words it),
    argument (the cap that was reached) and errno (a failed server connect)."""
    import os
    if cause is Cause.BAD_OPTION:
        return syn_error(detail, arg)
    if cause in (Cause.CLIENT_NOT_ALLOWED, Cause.DESTINATION_DENIED):
        return policy.wording(cause, detail, client, dst[0], dst[1])
    if cause in (Cause.FD_LIMIT, Cause.CONNECTION_LIMIT):
        return f"{arg} connections" + (" per worker" if cause is Cause.FD_LIMIT else "")
    if cause is Cause.PENDING_LIMIT:
        return f"{arg} SYNs held"
    if cause is Cause.MEMORY_PRESSURE:
        return f"the kernel's TCP memory at {arg} pages"
    if err:
        return f"server {dst[0]}:{dst[1]}: {os.strerror(err)}"
    return cause.value


def syn_error(code: int, arg: int) -> str:
    """The log line's reason for a SYN_* code (the core's refusal detail of a bad DST_OPT) and its argument."""
    return SYN_ERROR_TEXT[code].format(arg=arg, low=arg & 0xFF, high=arg >> 8, zero="::" if arg == 6 else "0.0.0.0")
