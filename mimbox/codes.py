"""The names and numbers the converter's C core and its Python share, declared once, here.

This module imports nothing of mimbox: every other module may take from it, and the C side gets the
same values through build/relaycore.h (`python -m mimbox.converter.layouts --header`). Layouts (ctypes structs)
are in mimbox.converter.layouts; what the numbers mean to a user is said where they are used.
"""
from __future__ import annotations

import enum

# config engine, and the core's code for each (in the order a user reads them: --engine's choices)
ENGINES = {"auto": 2, "splice": 1, "copy": 0, "uring": 3}
# config syn_path, and the core's code for each
SYN_PATHS = {"auto": 2, "hold": 0, "accept": 1}
MAX_WORKERS = 256              # workers of one converter, at most (the core's hand-over table)
SPARE_MAX = 64                 # server sockets a core makes ahead, per kind, at most (--spare-sockets)
MAX_SOURCES = 16               # the server side's source addresses, at most (--source-address)
PIPE_POOL = 1024               # empty pipes a core keeps for splice
ERRNO_SLOTS = 160              # errno-indexed counters (struct core_stats)
KEEPER_NAME = "mimbox-keeper"  # the process that resets a crashed converter's connections (core_keeper)

# where a worker's destinations come from (struct core_config dst_source)
DST_PYTHON, DST_STATIC, DST_TRANSPARENT, DST_EXPLICIT = range(4)
# what the core hands to Python (struct core_event kind)
EV_FD, EV_ACCEPTED, EV_REFUSED, EV_GIVEBACK, EV_ABORTED, EV_CLOSED = range(1, 7)
# what the SYN path does with a client SYN
SYN_HOLD, SYN_DEFER, SYN_REFUSE = range(3)
# core_policy's kinds (native/core/admit.c), one comment each in the generated enum policy_kind
POLICY = {"ALLOW_CLIENT": (0, "a client prefix allowed"),
          "OWN": (2, "one of this host's own destinations (an address, or a shorter local route)"),
          "OWN_FORGET": (3, "this host's own destinations forgotten: a new listing follows, ended by OWN_DONE"),
          "FORGET": (4, "the allowed clients and destination rules forgotten (a reload lists them anew)"),
          "OWN_DONE": (5, "the new listing of this host's own destinations is complete")}
# What the gate says of a newcomer (native/core/admit.c gate_open): under every cap, or the cap it
# meets -- the worker's pending_limit, its /24's or /64's pending_per_prefix, its address's
# pending_per_address. In convert mode a capped newcomer goes to Python (mimbox.converter.greetings), which
# makes room under that cap by resetting its oldest silent greeting.
GATE_OPEN, GATE_FULL, GATE_PREFIX_FULL, GATE_ADDRESS_FULL = range(4)
# a destination refused by no rule of the user's (a refusal's detail; a rule's index otherwise)
DENIED_PORT0, DENIED_OWN, DENIED_OWN_UNKNOWN = -2, -1, -3
# the mark of a refused SYN's verdict (the listener's filter rule answers it with RST), and its mask
REFUSE_MARK = 0x4D420000
REFUSE_MASK = 0xFFFF0000


class Cause(str, enum.Enum):
    """Why a connection was refused (before accept) or reset (after). CAUSE_<NAME> in C is its index
    in this declaration's order."""
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
    CONFLICTING_DESTINATION = "conflicting destination"   # explicit: a 2nd SYN of a (client, port) asked elsewhere
    BAD_SOURCE = "bad source address"           # no real client has it (mimbox.wire.addrs.source_bad): dropped
    MEMORY_PRESSURE = "memory pressure"         # the kernel's TCP memory near its pressure threshold (mimbox.host.resources)


CAUSES = list(Cause)
# why a SYN's DST_OPT was refused (mimbox.wire.dstopt.parse_options's messages; {arg} from the event);
# SYN_<NAME> in C is its index + 1
SYN_ERRORS = {"NO_DSTOPT": "no DST_OPT in SYN", "TRUNCATED": "bad DST_OPT: truncated option list",
              "BAD_LENGTH": "bad DST_OPT: bad option length {low} for kind {high}", "UNKNOWN_EXID": "bad DST_OPT: unknown ExID 0x{arg:04x}",
              "MORE_THAN_ONE": "bad DST_OPT: more than one DST_OPT",
              "DSTOPT_LENGTH": "bad DST_OPT: DST_OPT length {arg} (expected 10 or 22)",
              "PORT0": "bad DST_OPT: DST_OPT port 0", "ADDR0": "bad DST_OPT: DST_OPT address {zero}"}
SYN_ERROR_TEXT = ["", *SYN_ERRORS.values()]    # (mimbox.converter.synpath.syn_error)
