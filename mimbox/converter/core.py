"""The per-connection path in C (native/core/, built into build/librelaycore.so), loaded and checked
against its layouts (mimbox.converter.layouts), and a thin API.

    core = Core(CoreConfig(...))           # one per worker; owns the worker's epoll set
    core.policy(policy)                     # who may go where (mimbox.converter.safety.Policy's lists)
    core.queue(num)                         # hold client SYNs from NFQUEUE `num`
    core.listen(fd)                         # accept on this listener
    core.link(worker, fd)                   # a unix socket to another worker (hand-over of accepted clients)
    core.watch(fd, events)                  # a Python fd: reported back as Event(kind=EV_FD)
    for ev in core.run(timeout_ms): ...     # what is Python's (EV_FD, convert mode's clients, refusals to log)
    core.convert_connect(cfd, ...)          # convert mode: the message read, the core connects and relays

Why C: under Fig. 5's 1 KB load the interpreter cost ~40 µs per connection and ~70 µs per held
SYN (perf, results/percost_converter) where HAProxy's own code costs ~10 µs; the kernel's part is
the same for both. The relay keeps what is not per-SYN or per-connection routine: set-up, convert
mode's messages, log lines, stats, timers of its own.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
from dataclasses import dataclass

from mimbox.codes import CAUSES, KEEPER_NAME, POLICY, Cause
from mimbox.converter.layouts import (
    LAYOUTS,
    MAX_EVENTS,
    SIGNATURES,
    ConnInfo,
    CoreConfig,
    CoreStats,
    Event,
)
from mimbox.paths import RELAYCORE
from mimbox.wire import addrs


def load() -> ctypes.CDLL:
    """The built library, its signatures declared and its layouts checked against this module."""
    if not RELAYCORE.exists():
        raise RuntimeError(f"{RELAYCORE} is missing (run `./mimbox.sh build`)")
    lib = ctypes.CDLL(str(RELAYCORE), use_errno=True)
    for name, (res, args) in SIGNATURES.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    for i, layout in enumerate(LAYOUTS):
        if lib.core_abi(i) != ctypes.sizeof(layout):
            raise RuntimeError(f"{RELAYCORE}: {layout.__name__} is {lib.core_abi(i)} bytes in C, "
                               f"{ctypes.sizeof(layout)} here (rebuild: `./mimbox.sh build --force`)")
        for k, (name, *_) in enumerate(layout._fields_):      # every field, by name, where C has it
            if (lib.core_abi_field(i, k) or b"").decode() != name:
                raise RuntimeError(f"{RELAYCORE}: {layout.__name__} field {k} is {lib.core_abi_field(i, k)!r} in C, "
                                   f"{name!r} here (rebuild: `./mimbox.sh build --force`)")
            if lib.core_abi_offset(i, k) != getattr(layout, name).offset:
                raise RuntimeError(f"{RELAYCORE}: {layout.__name__}.{name} is at offset {lib.core_abi_offset(i, k)} "
                                   f"in C, {getattr(layout, name).offset} here (rebuild: `./mimbox.sh build --force`)")
        if lib.core_abi_offset(i, len(layout._fields_)) != -1:
            raise RuntimeError(f"{RELAYCORE}: {layout.__name__} has more fields in C than here")
    return lib


_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = load()
    return _lib


def port_n(port: int) -> int:
    return socket.htons(port)


def is_keeper(pid: int) -> bool:
    """Whether `pid` is a converter's keeper (it shares its converter's fds: count them once)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip() == KEEPER_NAME
    except OSError:
        return False


def addr_of(a, p: int) -> tuple[str, int]:
    """(address, port) from the core's 16 address bytes (mimbox.wire.addrs) and network-order port."""
    return addrs.text(a), socket.ntohs(p)


@dataclass
class Listed:
    """One relayed connection as the core reports it."""
    cfd: int
    sfd: int
    client: tuple[str, int]
    server: tuple[str, int]
    client_mptcp: bool
    server_mptcp: bool
    connecting: bool
    bytes_up: int
    bytes_down: int
    t_accept: float


class Core:
    """One worker's core (see the module's docstring). close() aborts what is still relayed."""

    def __init__(self, cfg: CoreConfig):
        self.lib = lib()
        self.cfg = cfg
        self.ptr = self.lib.core_new(ctypes.byref(cfg))
        if not self.ptr:
            raise OSError(errno.ENOMEM, "core_new failed")
        self.events = (Event * MAX_EVENTS)()

    def watch(self, fd: int, events: int) -> None:
        """Report `fd`'s events to Python (EV_FD)."""
        r = self.lib.core_watch(self.ptr, fd, events, 0)
        if r < 0:
            raise OSError(-r, f"epoll_ctl: {errno.errorcode.get(-r, r)}")

    def listen(self, fd: int) -> None:
        """Accept on the listener `fd` in the core."""
        r = self.lib.core_watch(self.ptr, fd, 1, 1)   # EPOLLIN, level-triggered
        if r < 0:
            raise OSError(-r, "epoll_ctl")

    def unwatch(self, fd: int) -> None:
        self.lib.core_unwatch(self.ptr, fd)

    def run(self, timeout_ms: int):
        """Serve the core's fds for up to `timeout_ms`; the events that are Python's (may be none).
        Raises InterruptedError when a signal came (Python's handler has run)."""
        n = self.lib.core_run(self.ptr, timeout_ms, self.events, MAX_EVENTS)
        if n < 0:
            if -n == errno.EINTR:
                raise InterruptedError
            raise OSError(-n, "epoll_wait")
        return self.events[:n]

    def sweep(self):
        """Connect and idle timeouts, convert answers waiting alone: the resulting events."""
        n = self.lib.core_sweep(self.ptr, self.events, MAX_EVENTS)
        return self.events[:n]

    def add(self, cfd: int, sfd: int, client: tuple[str, int], dst: tuple[str, int], t_syn: float,
            connecting: bool, tried_mptcp: bool = False, server_mptcp: bool = False,
            prefix: bytes = b"", early: bytes = b"") -> None:
        """Relay from now on: the core owns both fds (closes them)."""
        r = self.lib.core_add(self.ptr, cfd, sfd, int(connecting), int(tried_mptcp), int(server_mptcp),
                              addrs.packed(client[0]), port_n(client[1]), addrs.packed(dst[0]), port_n(dst[1]), t_syn,
                              prefix, len(prefix), early, len(early))
        if r < 0:
            raise OSError(-r, "core_add")

    def reconfigure(self, cfg: CoreConfig) -> None:
        """A reload: the fields of `cfg` that may change while serving (native/core/setup.c); the
        held-SYN and gate tables grow to a raised pending_limit. MemoryError (nothing applied) if
        they cannot."""
        if self.lib.core_reconfigure(self.ptr, ctypes.byref(cfg)) < 0:
            raise MemoryError(f"listener.pending_limit {cfg.pending_limit}: no memory for its tables")
        self.cfg = cfg

    def policy(self, policy, reset: bool = False) -> None:
        """Who may go where: a mimbox.converter.safety.Policy's allowed clients and destination rules (in order;
        reset: instead of the ones given before). This host's own destinations are the core's to read
        (own_refresh), or given by own_addresses. Raises ValueError past the rules table or when
        memory runs out (the converter does not start)."""
        if reset:
            self.lib.core_policy(self.ptr, POLICY["FORGET"][0], None, 0)
        for n in policy.allow_clients:
            if self.lib.core_policy(self.ptr, POLICY["ALLOW_CLIENT"][0], *addrs.prefix(n)) < 0:
                raise ValueError(f"allowed client prefixes: no memory for {len(policy.allow_clients)}")
        for r in policy.rules:
            if self.lib.core_rule(self.ptr, int(r.allow), *addrs.prefix(r.net), r.ports[0], r.ports[1]) < 0:
                raise ValueError("too many destination rules (at most 256)")

    def own_addresses(self, own, nets=()) -> None:
        """This host's own destinations given, instead of read from the kernel (own_refresh): for a
        core without a route socket (tests, the fuzz harness). If they cannot all be held (no
        memory), the core refuses every destination, and OSError says so."""
        self.lib.core_policy(self.ptr, POLICY["OWN_FORGET"][0], None, 0)
        for a in own:
            r = self.lib.core_policy(self.ptr, POLICY["OWN"][0], addrs.packed(a), 128)
            if r < 0:
                raise OSError(-r, f"this host's {len(own)} addresses: every destination is refused")
        for n in nets:
            r = self.lib.core_policy(self.ptr, POLICY["OWN"][0], *addrs.prefix(n))
            if r < 0:
                raise OSError(-r, f"this host's {len(nets)} local routes: every destination is refused")
        self.lib.core_policy(self.ptr, POLICY["OWN_DONE"][0], None, 0)

    def own_refresh(self, nlfd: int) -> tuple[int, int]:
        """This host's own destinations, listed anew from the kernel's local routing table (native/
        core/own.c) over `nlfd`, a NETLINK_ROUTE socket used for nothing else: (addresses, shorter
        local routes). OSError if the listing failed: every destination is refused until one succeeds."""
        r = self.lib.core_own_refresh(self.ptr, nlfd)
        if r < 0:
            raise OSError(-r, f"listing this host's own addresses: {os.strerror(-r)}")
        return self.lib.core_own_count(self.ptr, 0), self.lib.core_own_count(self.ptr, 1)

    def greeting_end(self, client: str, keep_admission: bool) -> None:
        """Convert mode: Python is done with a greeting (native/core/accept.c)."""
        self.lib.core_greeting_end(self.ptr, addrs.packed(client), int(keep_admission))

    def greeting_admit(self, client: tuple[str, int], count: bool = True) -> tuple[Cause, int] | None:
        """Convert mode: admit a greeting the gate had turned away, now that room may have been made:
        None, it is a greeting now; else (cause, GATE_* detail), counted as a refusal if `count`."""
        detail = ctypes.c_int(0)
        r = self.lib.core_greeting_admit(self.ptr, addrs.packed(client[0]), port_n(client[1]), int(count),
                                         ctypes.byref(detail))
        return None if r < 0 else (CAUSES[r], detail.value)

    def greetings(self) -> int:
        return self.lib.core_greetings(self.ptr)

    def refusal(self, client: str, dst: tuple[str, int]) -> tuple[Cause, int] | None:
        """The core's policy verdict for client -> dst: None (allowed) or (cause, detail) as
        mimbox.converter.safety.Policy.decide answers."""
        detail = ctypes.c_int(0)
        r = self.lib.core_refusal(self.ptr, addrs.packed(client), addrs.packed(dst[0]), port_n(dst[1]), ctypes.byref(detail))
        return None if r < 0 else (CAUSES[r], detail.value)

    def convert_connect(self, cfd: int, client: tuple[str, int], dst: tuple[str, int], t: float,
                        reply: bytes, early: bytes) -> tuple[Cause, int, int] | None:
        """Convert mode, the message read: the core checks the destination, connects and relays
        (None: it owns cfd now, `reply` goes to the client in front of the server's bytes). Else
        (cause, detail, errno): counted, the greeting's admission given back, cfd still the caller's."""
        detail, err = ctypes.c_int(0), ctypes.c_int(0)
        r = self.lib.core_convert_connect(self.ptr, cfd, addrs.packed(client[0]), port_n(client[1]), addrs.packed(dst[0]),
                                          port_n(dst[1]), t, reply, len(reply), early, len(early),
                                          ctypes.byref(detail), ctypes.byref(err))
        return None if r < 0 else (CAUSES[r], detail.value, err.value)

    def gate(self, client: str) -> int:
        """SYN_HOLD, SYN_DEFER or SYN_REFUSE for a SYN from `client` now (docs/running.md "SYN path")."""
        return self.lib.core_gate(self.ptr, addrs.packed(client))

    def queue(self, num: int) -> None:
        """Hold client SYNs from NFQUEUE `num` (mimbox.host.netfilter installs the rules)."""
        r = self.lib.core_queue(self.ptr, num)
        if r < 0:
            raise OSError(-r, f"NFQUEUE {num}: {errno.errorcode.get(-r, r)}")

    def link(self, worker: int, fd: int) -> None:
        """A unix datagram socket to another worker: clients whose SYN it holds go there (SCM_RIGHTS),
        and what it sends here is paired with the SYNs held here."""
        r = self.lib.core_link(self.ptr, worker, fd)
        if r < 0:
            raise OSError(-r, "core_link")

    def pending(self) -> int:
        """SYNs held, or released and waiting for accept()."""
        return self.lib.core_pending(self.ptr)

    def stats(self) -> CoreStats:
        return self.lib.core_stats(self.ptr).contents

    def connections(self) -> list[Listed]:
        n = self.active() + 16
        buf = (ConnInfo * n)()
        got = self.lib.core_list(self.ptr, buf, n)
        return [Listed(i.cfd, i.sfd, addr_of(i.caddr, i.cport), addr_of(i.daddr, i.dport), bool(i.client_mptcp),
                       bool(i.server_mptcp), bool(i.connecting), i.bytes_up, i.bytes_down, i.t_accept)
                for i in buf[:got]]

    def keep(self) -> None:
        """Start the keeper: if this process dies without close(), its connections are reset (RST)
        rather than ended as if complete. It shares this process's file table (native/core/keeper.c)."""
        r = self.lib.core_keeper(self.ptr)
        if r < 0:
            raise OSError(-r, "clone(CLONE_FILES) for the keeper")

    def active(self) -> int:
        return self.lib.core_active(self.ptr)

    def abort_all(self) -> int:
        return self.lib.core_abort_all(self.ptr)

    def close(self) -> None:
        if self.ptr:
            self.lib.core_free(self.ptr)
            self.ptr = None
