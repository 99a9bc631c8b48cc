"""The per-connection path in C (native/core/, built into build/librelaycore.so): its layouts and
codes, declared once here (C gets them from `python -m mimbox.core --header`), and a thin API.

    core = Core(CoreConfig(...))           # one per worker; owns the worker's epoll set
    core.policy(policy)                     # who may go where (mimbox.safety.Policy's lists)
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

from mimbox import addrs
from mimbox.config import MAX_WORKERS
from mimbox.netfilter import REFUSE_MARK, REFUSE_MASK
from mimbox.paths import RELAYCORE
from mimbox.safety import DENIED_OWN, DENIED_OWN_UNKNOWN, DENIED_PORT0
from mimbox.synpath import Cause

ENGINES = {"copy": 0, "splice": 1, "auto": 2, "uring": 3}
SYN_PATHS = {"hold": 0, "accept": 1, "auto": 2}
DST_PYTHON, DST_STATIC, DST_TRANSPARENT, DST_EXPLICIT = range(4)
EV_FD, EV_ACCEPTED, EV_REFUSED, EV_GIVEBACK, EV_ABORTED, EV_CLOSED = range(1, 7)
SYN_HOLD, SYN_DEFER, SYN_REFUSE = range(3)
# core_policy's kinds (native/core/admit.c): a client prefix allowed; one of this host's own
# destinations; forget those (a new listing follows, ended by OWN_DONE); forget clients and rules
POLICY = {"ALLOW_CLIENT": 0, "OWN": 2, "OWN_FORGET": 3, "FORGET": 4, "OWN_DONE": 5}
# What the gate says of a newcomer (native/core/admit.c gate_open): under every cap, or the cap it
# meets -- the worker's pending_limit, its /24's or /64's pending_per_prefix, its address's
# pending_per_address. In convert mode a capped newcomer goes to Python (mimbox.greetings), which
# makes room under that cap by resetting its oldest silent greeting.
GATE_OPEN, GATE_FULL, GATE_PREFIX_FULL, GATE_ADDRESS_FULL = range(4)
CAUSES = list(Cause)           # CAUSE_<NAME> in C is the index here
# why a SYN's DST_OPT was refused (mimbox.dstopt.parse_options's messages; {arg} from the event)
SYN_ERRORS = {"NO_DSTOPT": "no DST_OPT in SYN", "TRUNCATED": "bad DST_OPT: truncated option list",
              "BAD_LENGTH": "bad DST_OPT: bad option length {low} for kind {high}", "UNKNOWN_EXID": "bad DST_OPT: unknown ExID 0x{arg:04x}",
              "MORE_THAN_ONE": "bad DST_OPT: more than one DST_OPT",
              "DSTOPT_LENGTH": "bad DST_OPT: DST_OPT length {arg} (expected 10 or 22)",
              "PORT0": "bad DST_OPT: DST_OPT port 0", "ADDR0": "bad DST_OPT: DST_OPT address {zero}"}
SYN_ERROR_TEXT = ["", *SYN_ERRORS.values()]    # SYN_<NAME> in C is the index here (mimbox.synpath.syn_error)
ERRNO_SLOTS = 160              # errno-indexed counters (struct core_stats)
MAX_EVENTS = 512
KEEPER_NAME = "mimbox-keeper"  # the process that resets a crashed converter's connections (core_keeper)
PIPE_POOL = 1024               # empty pipes a core keeps for splice (emitted into the C header)
SPARE_MAX = 64                 # server sockets a core makes ahead, per kind, at most (--spare-sockets)
# histogram upper bounds (the last bucket is above all): server connect time, connection duration
CONNECT_BUCKETS_US = (100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 1000000, 2500000, 10000000)
DURATION_BUCKETS_S = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800, 3600)
ETIME = errno.ETIME            # an idle timeout, in EV_ABORTED


ADDR = ctypes.c_uint8 * 16    # an address of either family: IPv6, IPv4 as ::ffff:a.b.c.d (native/core/addr.h)


class CoreConfig(ctypes.Structure):
    """struct core_config."""
    _fields_ = [("engine", ctypes.c_int32), ("pipe_size", ctypes.c_int32), ("splice_after", ctypes.c_int32),
                ("dst_source", ctypes.c_int32), ("static_addr", ADDR), ("static_port", ctypes.c_uint16),
                ("_pad", ctypes.c_uint16), ("recorder_fd", ctypes.c_int32), ("server_mptcp", ctypes.c_int32),
                ("server_rcvbuf", ctypes.c_int32), ("server_sndbuf", ctypes.c_int32), ("fd_capacity", ctypes.c_int32),
                ("worker", ctypes.c_int32), ("workers", ctypes.c_int32), ("syns_queued", ctypes.c_int32),
                ("_pad2", ctypes.c_int32), ("server_mptcp_retry", ctypes.c_double),
                ("connect_timeout", ctypes.c_double), ("idle_timeout", ctypes.c_double),
                ("prefix_wait", ctypes.c_double), ("admission", ctypes.c_void_p),
                ("admission_limit", ctypes.c_int64), ("held_slots", ctypes.c_void_p), ("held_mask", ctypes.c_uint64),
                ("syn_path", ctypes.c_int32), ("pending_limit", ctypes.c_int32), ("pending_per_prefix", ctypes.c_int32),
                ("explicit_opt", ctypes.c_int32), ("handshake_timeout", ctypes.c_double),
                ("spare_sockets", ctypes.c_int32), ("busy_poll_us", ctypes.c_int32),
                ("access_log_every", ctypes.c_int32), ("convert_header_field", ctypes.c_int32),
                ("synack_fd", ctypes.c_int32),         # mimbox.synack's map (convert mode), <= 0: none
                ("uring_buffers", ctypes.c_int32),    # uring: provided buffers (a power of two), 0: 1024
                ("pending_per_address", ctypes.c_int32)]   # held SYNs and greetings from one client address


class Event(ctypes.Structure):
    """struct core_event: what the core hands to Python. Addresses as 16 bytes, ports in network order."""
    _fields_ = [("kind", ctypes.c_int32), ("fd", ctypes.c_int32), ("events", ctypes.c_uint32),
                ("err", ctypes.c_int32), ("caddr", ADDR), ("daddr", ADDR),
                ("cport", ctypes.c_uint16), ("dport", ctypes.c_uint16), ("cause", ctypes.c_int32),
                ("detail", ctypes.c_int32), ("arg", ctypes.c_int32), ("after_accept", ctypes.c_int32),
                ("bytes_up", ctypes.c_uint64), ("bytes_down", ctypes.c_uint64), ("duration", ctypes.c_double)]


class CoreStats(ctypes.Structure):
    """struct core_stats: the core's counters (the relay adds its own)."""
    _fields_ = [(n, ctypes.c_uint64) for n in ("accepted", "client_mptcp", "client_tcp", "server_mptcp",
                                               "server_tcp", "closed", "bytes_up", "bytes_down",
                                               "server_connects", "server_tcp_remembered")] + [
        ("server_connect_us_sum", ctypes.c_double), ("server_connect_us_max", ctypes.c_double)] + [
        (n, ctypes.c_uint64) for n in ("active", "pipes_pooled", "idle_timeouts", "connect_timeouts")] + [
        ("errors", ctypes.c_uint64 * ERRNO_SLOTS), ("accept_errors", ctypes.c_uint64 * ERRNO_SLOTS)] + [
        (n, ctypes.c_uint64) for n in ("syns", "deferred", "held", "handshake_timeouts", "held_connect_timeouts",
                                       "accept_while_held", "handed_over")] + [
        ("handover_errors", ctypes.c_uint64 * ERRNO_SLOTS)] + [
        ("refused", ctypes.c_uint64 * len(CAUSES)), ("server_errors", ctypes.c_uint64 * ERRNO_SLOTS)] + [
        (n, ctypes.c_uint64) for n in ("spare_used", "spare_made", "busy_polls", "spares", "accept_pauses",
                                       "refused_after_accept", "access_log_dropped", "synack_options")] + [
        ("connect_hist", ctypes.c_uint64 * (len(CONNECT_BUCKETS_US) + 1)),
        ("duration_hist", ctypes.c_uint64 * (len(DURATION_BUCKETS_S) + 1)), ("duration_sum", ctypes.c_double),
        ("buffer_waits", ctypes.c_uint64),     # uring: recvs that found the buffer pool empty
        ("timer_visits", ctypes.c_uint64)]     # timers.c: entries the wheel looked at (follows timers due)


class ConnInfo(ctypes.Structure):
    """struct core_conn_info: one relayed connection, for `mimbox stats --connections`."""
    _fields_ = [("cfd", ctypes.c_int32), ("sfd", ctypes.c_int32), ("caddr", ADDR),
                ("daddr", ADDR), ("cport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("client_mptcp", ctypes.c_uint8), ("server_mptcp", ctypes.c_uint8), ("connecting", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8), ("bytes_up", ctypes.c_uint64), ("bytes_down", ctypes.c_uint64),
                ("t_accept", ctypes.c_double)]


class SynInfo(ctypes.Structure):
    """struct syn_info: core_parse_syn()'s answer (tests compare it with mimbox.dstopt)."""
    _fields_ = [("saddr", ADDR), ("daddr", ADDR), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("dst_addr", ADDR), ("dst_port", ctypes.c_uint16),
                ("has_dst", ctypes.c_int32), ("error", ctypes.c_int32), ("arg", ctypes.c_int32),
                ("mp_join", ctypes.c_int32), ("mp_capable", ctypes.c_int32),
                ("bad_source", ctypes.c_int32)]    # a source no real client has (mimbox.addrs.source_bad)


LAYOUTS = (CoreConfig, Event, CoreStats, ConnInfo, SynInfo)     # core_abi(i) is sizeof the i-th
C_STRUCTS = ("core_config", "core_event", "core_stats", "core_conn_info", "syn_info")   # their C names


_C_TYPES = {ctypes.c_int32: "int32_t", ctypes.c_uint32: "uint32_t", ctypes.c_uint16: "uint16_t",
            ctypes.c_uint8: "uint8_t", ctypes.c_int64: "int64_t", ctypes.c_uint64: "uint64_t",
            ctypes.c_double: "double"}


_C_POINTERS = {"admission": "int64_t", "held_slots": "uint64_t"}   # what c_void_p fields point to


def _c_field(name: str, t) -> str:
    """One field of a generated struct: `uint64_t errors[160];`, `int64_t *admission;`."""
    if issubclass(t, ctypes.Array):
        return f"\t{_C_TYPES[t._type_]} {name}[{t._length_}];"
    if t is ctypes.c_void_p:
        return f"\t{_C_POINTERS[name]} *{name};"
    return f"\t{_C_TYPES[t]} {name};"


def c_structs() -> list[str]:
    """The shared structs in C, from the ctypes layouts above (declared once: here)."""
    lines = []
    for layout, cname in zip(LAYOUTS, C_STRUCTS):
        lines += [f"/* {layout.__doc__.strip()} */", f"struct {cname} {{",
                  *(_c_field(name, t) for name, t in layout._fields_), "};"]
    return lines


def c_header() -> str:
    """The layouts and codes the C side shares with this module (build/relaycore.h)."""
    lines = ["/* Generated by `python -m mimbox.core --header` from mimbox/core.py: do not edit. */", "#pragma once",
             "#include <stdint.h>"]
    lines += [f"#define ERRNO_SLOTS {ERRNO_SLOTS}", f"#define MAX_WORKERS {MAX_WORKERS}",
              f'#define KEEPER_NAME "{KEEPER_NAME}"', f"#define DENIED_PORT0 ({DENIED_PORT0})",
              f"#define DENIED_OWN ({DENIED_OWN})", f"#define DENIED_OWN_UNKNOWN ({DENIED_OWN_UNKNOWN})"]
    lines += [f"#define POLICY_{n} {v}" for n, v in POLICY.items()]
    lines += [f"#define GATE_{n} {v}" for n, v in (("OPEN", GATE_OPEN), ("FULL", GATE_FULL),
                                                    ("PREFIX_FULL", GATE_PREFIX_FULL), ("ADDRESS_FULL", GATE_ADDRESS_FULL))]
    lines += [f"#define CAUSE_{c.name} {i}" for i, c in enumerate(CAUSES)] + [f"#define CAUSE_COUNT {len(CAUSES)}"]
    lines += [f"#define SYN_{name} {i + 1}" for i, name in enumerate(SYN_ERRORS)]
    lines += [f"#define SYN_{n} {v}" for n, v in (("HOLD", SYN_HOLD), ("DEFER", SYN_DEFER), ("REFUSE", SYN_REFUSE))]
    lines += [f"#define SYN_PATH_{n.upper()} {v}" for n, v in SYN_PATHS.items()]
    lines += [f"#define ENGINE_{n.upper()} {v}" for n, v in ENGINES.items()]
    lines += [f"#define DST_{n} {v}" for n, v in (("PYTHON", DST_PYTHON), ("STATIC", DST_STATIC),
                                                   ("TRANSPARENT", DST_TRANSPARENT), ("EXPLICIT", DST_EXPLICIT))]
    lines += [f"#define EV_{n} {v}" for n, v in (("FD", EV_FD), ("ACCEPTED", EV_ACCEPTED), ("REFUSED", EV_REFUSED),
                                                  ("GIVEBACK", EV_GIVEBACK), ("ABORTED", EV_ABORTED),
                                                  ("CLOSED", EV_CLOSED))]
    from mimbox.rfc8803 import Error, Tlv, error_reply
    busy = error_reply(Error.RESOURCE_EXCEEDED)
    lines += [f"#define TLV_EXTENDED_TCP_HEADER {int(Tlv.EXTENDED_TCP_HEADER)}"]
    lines += ["/* RFC 8803: the answer to a client refused for a cap (mimbox.rfc8803.error_reply) */",
              f"#define CONVERT_RESOURCE_EXCEEDED {{{', '.join(f'0x{b:02x}' for b in busy)}}}"]
    for count, name, bounds in (("CONNECT_BUCKET_COUNT", "CONNECT_BUCKETS_US", CONNECT_BUCKETS_US),
                                ("DURATION_BUCKET_COUNT", "DURATION_BUCKETS_S", DURATION_BUCKETS_S)):
        lines += [f"#define {count} {len(bounds)}", f"#define {name}_INIT {{{', '.join(map(str, map(float, bounds)))}}}"]
    lines += ["/* each shared struct's field offsets, in this module's field order: core_abi_offset() returns them */"]
    for i, (layout, cname) in enumerate(zip(LAYOUTS, C_STRUCTS)):
        lines.append(f"#define ABI_OFFSETS_{i} {{" + ", ".join(f"offsetof(struct {cname}, {f[0]})"
                                                              for f in layout._fields_) + "}")
        lines.append(f"#define ABI_NAMES_{i} {{" + ", ".join(f'"{f[0]}"' for f in layout._fields_) + "}")
    lines += [f"#define REFUSE_MARK 0x{REFUSE_MARK:X}u", f"#define REFUSE_MASK 0x{REFUSE_MASK:X}u", f"#define SPARE_MAX {SPARE_MAX}", f"#define PIPE_POOL {PIPE_POOL}"]
    lines += c_structs()
    return "\n".join(lines) + "\n"


_RANGES = {ctypes.c_int32: (-(1 << 31), (1 << 31) - 1), ctypes.c_uint32: (0, (1 << 32) - 1),
           ctypes.c_uint16: (0, (1 << 16) - 1), ctypes.c_uint8: (0, 255),
           ctypes.c_int64: (-(1 << 63), (1 << 63) - 1), ctypes.c_uint64: (0, (1 << 64) - 1)}


def field_problem(layout, name: str, value) -> str | None:
    """Why `value` does not fit field `name` of a shared layout (a ctypes field wraps silently): a
    number outside its integer type's range, or a double that is not finite; None if it fits."""
    import math
    t = dict(layout._fields_)[name]
    if t is ctypes.c_double:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name}: {value!r} is not a finite number"
    elif t in _RANGES and isinstance(value, (int, bool)):
        lo, hi = _RANGES[t]
        if not lo <= value <= hi:
            return f"{name}: {value} is outside {lo}..{hi} (the core's {_C_TYPES[t]})"
    return None


def load() -> ctypes.CDLL:
    """The built library, its signatures declared and its layouts checked against this module."""
    if not RELAYCORE.exists():
        raise RuntimeError(f"{RELAYCORE} is missing (run `./mimbox.sh build`)")
    lib = ctypes.CDLL(str(RELAYCORE), use_errno=True)
    P, I, U32, U16, A = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint16, ctypes.c_char_p
    sig = {"core_new": (P, [ctypes.POINTER(CoreConfig)]), "core_free": (None, [P]),
           "core_watch": (I, [P, I, U32, I]), "core_unwatch": (I, [P, I]),
           "core_run": (I, [P, I, ctypes.POINTER(Event), I]), "core_sweep": (I, [P, ctypes.POINTER(Event), I]),
           "core_add": (I, [P, I, I, I, I, I, A, U16, A, U16, ctypes.c_double, ctypes.c_char_p, U32,
                            ctypes.c_char_p, U32]),
           "core_policy": (I, [P, I, A, I]), "core_rule": (I, [P, I, A, I, I, I]),
           "core_greeting_end": (None, [P, A, I]), "core_greetings": (I, [P]),
           "core_greeting_admit": (I, [P, A, U16, I, ctypes.POINTER(ctypes.c_int)]),
           "core_own_refresh": (I, [P, I]), "core_own_count": (I, [P, I]), "core_refusal": (I, [P, A, A, U16, ctypes.POINTER(ctypes.c_int)]),
           "core_convert_connect": (I, [P, I, A, U16, A, U16, ctypes.c_double, ctypes.c_char_p, U32,
                                        ctypes.c_char_p, U32, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int)]),
           "core_gate": (I, [P, A]), "core_gate_hold": (None, [P, A, I]), "core_queue": (I, [P, I]), "core_link": (I, [P, I, I]), "core_worker_of_port": (I, [I, I]),
           "core_parse_syn": (I, [ctypes.c_char_p, I, ctypes.POINTER(SynInfo)]), "core_pending": (I, [P]),
           "core_stats": (ctypes.POINTER(CoreStats), [P]), "core_list": (I, [P, ctypes.POINTER(ConnInfo), I]),
           "core_active": (I, [P]), "core_abort_all": (I, [P]), "core_abi": (I, [I]),
           "core_admit": (I, [P, ctypes.c_int64]), "core_unadmit": (None, [P]),
           "core_keeper": (I, [P]), "core_keeper_release": (None, [P]),
           "core_reconfigure": (I, [P, ctypes.POINTER(CoreConfig)]), "core_abi_offset": (I, [I, I]),
           "core_abi_field": (ctypes.c_char_p, [I, I])}
    for name, (res, args) in sig.items():
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
    """(address, port) from the core's 16 address bytes (mimbox.addrs) and network-order port."""
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
        """Who may go where: a mimbox.safety.Policy's allowed clients and destination rules (in order;
        reset: instead of the ones given before). This host's own destinations are the core's to read
        (own_refresh), or given by own_addresses. Raises ValueError past the rules table or when
        memory runs out (the converter does not start)."""
        if reset:
            self.lib.core_policy(self.ptr, POLICY["FORGET"], None, 0)
        for n in policy.allow_clients:
            if self.lib.core_policy(self.ptr, POLICY["ALLOW_CLIENT"], *addrs.prefix(n)) < 0:
                raise ValueError(f"allowed client prefixes: no memory for {len(policy.allow_clients)}")
        for r in policy.rules:
            if self.lib.core_rule(self.ptr, int(r.allow), *addrs.prefix(r.net), r.ports[0], r.ports[1]) < 0:
                raise ValueError("too many destination rules (at most 256)")

    def own_addresses(self, own, nets=()) -> None:
        """This host's own destinations given, instead of read from the kernel (own_refresh): for a
        core without a route socket (tests, the fuzz harness). If they cannot all be held (no
        memory), the core refuses every destination, and OSError says so."""
        self.lib.core_policy(self.ptr, POLICY["OWN_FORGET"], None, 0)
        for a in own:
            r = self.lib.core_policy(self.ptr, POLICY["OWN"], addrs.packed(a), 128)
            if r < 0:
                raise OSError(-r, f"this host's {len(own)} addresses: every destination is refused")
        for n in nets:
            r = self.lib.core_policy(self.ptr, POLICY["OWN"], *addrs.prefix(n))
            if r < 0:
                raise OSError(-r, f"this host's {len(nets)} local routes: every destination is refused")
        self.lib.core_policy(self.ptr, POLICY["OWN_DONE"], None, 0)

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
        mimbox.safety.Policy.decide answers."""
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
        """Hold client SYNs from NFQUEUE `num` (mimbox.netfilter installs the rules)."""
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


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="the C core's shared codes")
    ap.add_argument("--header", action="store_true", help="print build/relaycore.h")
    if ap.parse_args(argv).header:
        sys.stdout.write(c_header())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
