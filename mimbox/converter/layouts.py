"""The layouts the C core and Python share (struct core_config, core_event, core_stats, core_conn_info,
syn_info as ctypes structures), the core's exports as ctypes calls them (SIGNATURES), and the C
header made from both and from mimbox.codes: `python -m mimbox.converter.layouts --header` writes
build/relaycore.h (native/build.py). Declared once, here; the core checks each layout field by field
at load (mimbox.converter.core.load), tests/unit/test_abi.py holds SIGNATURES against native/core/core.h.
"""
from __future__ import annotations

import ctypes
import errno

from mimbox.codes import (
    CAUSES,
    DENIED_OWN,
    DENIED_OWN_UNKNOWN,
    DENIED_PORT0,
    DST_EXPLICIT,
    DST_PYTHON,
    DST_STATIC,
    DST_TRANSPARENT,
    ENGINES,
    ERRNO_SLOTS,
    EV_ABORTED,
    EV_ACCEPTED,
    EV_CLOSED,
    EV_FD,
    EV_GIVEBACK,
    EV_REFUSED,
    GATE_ADDRESS_FULL,
    GATE_FULL,
    GATE_OPEN,
    GATE_PREFIX_FULL,
    KEEPER_NAME,
    MAX_SOURCES,
    MAX_WORKERS,
    PIPE_POOL,
    POLICY,
    REFUSE_MARK,
    REFUSE_MASK,
    SPARE_MAX,
    SYN_DEFER,
    SYN_ERRORS,
    SYN_HOLD,
    SYN_PATHS,
    SYN_REFUSE,
)

MAX_EVENTS = 512
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
                ("synack_fd", ctypes.c_int32),         # mimbox.host.synack's map (convert mode), <= 0: none
                ("uring_buffers", ctypes.c_int32),    # uring: provided buffers (a power of two), 0: 1024
                ("pending_per_address", ctypes.c_int32),   # held SYNs and greetings from one client address
                ("source_addrs", ctypes.c_uint8 * (16 * MAX_SOURCES)),   # --source-address: nsources ADDRs
                ("nsources", ctypes.c_int32)]


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
        ("timer_visits", ctypes.c_uint64),     # timers.c: entries the wheel looked at (follows timers due)
        ("dest_evictions", ctypes.c_uint64),   # dest.c: a remembered destination pushed out (16 live around its key)
        ("wakeups", ctypes.c_uint64)]          # loop.c: waits that ended with events (the worker woke for work)


class ConnInfo(ctypes.Structure):
    """struct core_conn_info: one relayed connection, for `mimbox stats --connections`."""
    _fields_ = [("cfd", ctypes.c_int32), ("sfd", ctypes.c_int32), ("caddr", ADDR),
                ("daddr", ADDR), ("cport", ctypes.c_uint16), ("dport", ctypes.c_uint16),
                ("client_mptcp", ctypes.c_uint8), ("server_mptcp", ctypes.c_uint8), ("connecting", ctypes.c_uint8),
                ("_pad", ctypes.c_uint8), ("bytes_up", ctypes.c_uint64), ("bytes_down", ctypes.c_uint64),
                ("t_accept", ctypes.c_double)]


class SynInfo(ctypes.Structure):
    """struct syn_info: core_parse_syn()'s answer (tests compare it with mimbox.wire.dstopt)."""
    _fields_ = [("saddr", ADDR), ("daddr", ADDR), ("sport", ctypes.c_uint16),
                ("dport", ctypes.c_uint16), ("dst_addr", ADDR), ("dst_port", ctypes.c_uint16),
                ("has_dst", ctypes.c_int32), ("error", ctypes.c_int32), ("arg", ctypes.c_int32),
                ("mp_join", ctypes.c_int32), ("mp_capable", ctypes.c_int32),
                ("bad_source", ctypes.c_int32)]    # a source no real client has (mimbox.wire.addrs.source_bad)


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
    lines = ["/* Generated by `python -m mimbox.converter.layouts --header` from mimbox/converter/layouts.py and mimbox/codes.py: do not edit. */", "#pragma once",
             "#include <stdint.h>"]
    lines += [f"#define ERRNO_SLOTS {ERRNO_SLOTS}", f"#define MAX_WORKERS {MAX_WORKERS}",
              f'#define KEEPER_NAME "{KEEPER_NAME}"', f"#define DENIED_PORT0 ({DENIED_PORT0})",
              f"#define DENIED_OWN ({DENIED_OWN})", f"#define DENIED_OWN_UNKNOWN ({DENIED_OWN_UNKNOWN})"]
    lines += ["/* core_policy's kinds (native/core/admit.c) */", "enum policy_kind {",
              *(f"\tPOLICY_{n} = {v},\t/* {what} */" for n, (v, what) in POLICY.items()), "};"]
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
    from mimbox.wire.rfc8803 import Error, Tlv, error_reply
    busy = error_reply(Error.RESOURCE_EXCEEDED)
    lines += [f"#define TLV_EXTENDED_TCP_HEADER {int(Tlv.EXTENDED_TCP_HEADER)}"]
    lines += ["/* RFC 8803: the answer to a client refused for a cap (mimbox.wire.rfc8803.error_reply) */",
              f"#define CONVERT_RESOURCE_EXCEEDED {{{', '.join(f'0x{b:02x}' for b in busy)}}}"]
    for count, name, bounds in (("CONNECT_BUCKET_COUNT", "CONNECT_BUCKETS_US", CONNECT_BUCKETS_US),
                                ("DURATION_BUCKET_COUNT", "DURATION_BUCKETS_S", DURATION_BUCKETS_S)):
        lines += [f"#define {count} {len(bounds)}", f"#define {name}_INIT {{{', '.join(map(str, map(float, bounds)))}}}"]
    lines += ["/* each shared struct's field offsets, in this module's field order: core_abi_offset() returns them */"]
    for i, (layout, cname) in enumerate(zip(LAYOUTS, C_STRUCTS)):
        lines.append(f"#define ABI_OFFSETS_{i} {{" + ", ".join(f"offsetof(struct {cname}, {f[0]})"
                                                              for f in layout._fields_) + "}")
        lines.append(f"#define ABI_NAMES_{i} {{" + ", ".join(f'"{f[0]}"' for f in layout._fields_) + "}")
    lines += [f"#define REFUSE_MARK 0x{REFUSE_MARK:X}u", f"#define REFUSE_MASK 0x{REFUSE_MASK:X}u", f"#define SPARE_MAX {SPARE_MAX}", f"#define MAX_SOURCES {MAX_SOURCES}", f"#define PIPE_POOL {PIPE_POOL}"]
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


# every export of native/core/core.h, as ctypes calls it (tests/unit/test_abi.py holds the two together)
_P, _I, _U32, _U16, _A = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_uint16, ctypes.c_char_p
_INT_P = ctypes.POINTER(ctypes.c_int)
SIGNATURES = {
    "core_new": (_P, [ctypes.POINTER(CoreConfig)]),
    "core_reconfigure": (_I, [_P, ctypes.POINTER(CoreConfig)]),
    "core_free": (None, [_P]),
    "core_abort_all": (_I, [_P]),
    "core_watch": (_I, [_P, _I, _U32, _I]),
    "core_unwatch": (_I, [_P, _I]),
    "core_run": (_I, [_P, _I, ctypes.POINTER(Event), _I]),
    "core_sweep": (_I, [_P, ctypes.POINTER(Event), _I]),
    "core_policy": (_I, [_P, _I, _A, _I]),
    "core_rule": (_I, [_P, _I, _A, _I, _I, _I]),
    "core_refusal": (_I, [_P, _A, _A, _U16, _INT_P]),
    "core_gate": (_I, [_P, _A]),
    "core_gate_hold": (None, [_P, _A, _I]),
    "core_admit": (_I, [_P, ctypes.c_int64]),
    "core_unadmit": (None, [_P]),
    "core_own_refresh": (_I, [_P, _I]),
    "core_own_count": (_I, [_P, _I]),
    "core_queue": (_I, [_P, _I]),
    "core_pending": (_I, [_P]),
    "core_parse_syn": (_I, [_A, _I, ctypes.POINTER(SynInfo)]),
    "core_link": (_I, [_P, _I, _I]),
    "core_worker_of_port": (_I, [_I, _I]),
    "core_greeting_end": (None, [_P, _A, _I]),
    "core_greetings": (_I, [_P]),
    "core_greeting_admit": (_I, [_P, _A, _U16, _I, _INT_P]),
    "core_convert_connect": (_I, [_P, _I, _A, _U16, _A, _U16, ctypes.c_double, _A, _U32, _A, _U32, _INT_P, _INT_P]),
    "core_cause_of_errno": (_I, [_I]),
    "core_add": (_I, [_P, _I, _I, _I, _I, _I, _A, _U16, _A, _U16, ctypes.c_double, _A, _U32, _A, _U32]),
    "core_list": (_I, [_P, ctypes.POINTER(ConnInfo), _I]),
    "core_active": (_I, [_P]),
    "core_stats": (ctypes.POINTER(CoreStats), [_P]),
    "core_abi": (_I, [_I]),
    "core_abi_offset": (_I, [_I, _I]),
    "core_abi_field": (_A, [_I, _I]),
    "core_keeper": (_I, [_P]),
    "core_keeper_release": (None, [_P]),
}



def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="the C core's shared layouts and codes")
    ap.add_argument("--header", action="store_true", help="print build/relaycore.h")
    if ap.parse_args(argv).header:
        sys.stdout.write(c_header())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
