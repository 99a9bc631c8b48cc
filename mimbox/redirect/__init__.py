"""Redirection modes beyond the core's own: the core (native/core/dest.c) finds a connection's server
itself in explicit (DST_OPT in the client's SYN, or the BPF recorder's map), transparent (the
address TPROXY kept) and static mode (the configured upstream). `convert` is RFC 8803: the
destination is the stream's first bytes, read by the relay (mimbox.redirect.convert).
"""
