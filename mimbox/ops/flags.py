"""The command line's flags: the parser of `mimbox run` and its kin (build_parser), and the one place
flags (and a --config file under them) become a Config (config_from_args)."""
from __future__ import annotations

import argparse
import dataclasses

from mimbox.codes import ENGINES
from mimbox.config import (
    CONVERT_COMPAT,
    LOG_LEVELS,
    MODES,
    BufferConfig,
    Config,
    ListenerConfig,
    SafetyConfig,
    parse_hostport,
    parse_size,
)




def _ports(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(",") if p)


def build_parser(only_given: bool = False) -> argparse.ArgumentParser:
    """The command line. only_given: `run`'s options keep no defaults, so that the parsed namespace
    holds only the flags given (they override the config file)."""
    ap = argparse.ArgumentParser(prog="mimbox", description="MiMBox: a Multipath TCP <-> TCP protocol converter.")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors (mimbox --debug run ...)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the converter", description=(
        "Terminate client connections and convert them to server connections, MPTCP <-> TCP. "
        "Client SYNs are held (NFQUEUE) until the server answers, so a refused server gives the "
        "client a RST; bytes are moved with splice(). Run as root on the converter host."))
    r.add_argument("--config", metavar="FILE",
                   help="a TOML config file (mimbox.ops.configfile; check it with `mimbox check-config FILE`); "
                        "flags given here override it; SIGHUP re-reads it")
    g = r.add_argument_group("listener and redirection")
    g.add_argument("--listen", default=f"{ListenerConfig.addr}:{ListenerConfig.port}", metavar="ADDR:PORT",
                   help="where clients connect; [::]:PORT serves IPv6 and IPv4 clients, [ADDR]:PORT one IPv6 "
                        "address; in transparent mode its port only names the rules and stats socket: one "
                        "listener per --intercept port takes the connections")
    g.add_argument("--mode", choices=MODES, default=ListenerConfig.mode,
                   help="explicit: server from the SYN's DST_OPT (use `mimbox client`); transparent: on the "
                        "path, intercept with TPROXY; static: one fixed --upstream; convert: RFC 8803, the server "
                        "in a Convert message in the SYN's data (use `mimbox client --convert`)")
    g.add_argument("--convert-cookie-file", metavar="PATH",
                   help="convert mode: serve only clients whose Convert message carries the Cookie TLV read "
                        "from this file (its first line; others get Error 'Missing Cookie' or 'Not Authorized')")
    g.add_argument("--convert-cookie", metavar="TEXT",
                   help="as --convert-cookie-file, the cookie on the command line (visible to every local user "
                        "in ps: prefer the file)")
    g.add_argument("--convert-compat", choices=CONVERT_COMPAT, default=None,
                   help="convert mode: rfc (default) answers as RFC 8803 (header field zero); draft writes the "
                        "drafts' magic number 0x2263 there, which Tessares' libconvert requires")
    g.add_argument("--upstream", metavar="HOST:PORT", help="static mode: the server (IPv6: [ADDR]:PORT)")
    g.add_argument("--intercept", metavar="PORTS", default="", help="transparent mode: destination ports, e.g. 80,443")
    g.add_argument("--intercept-from", action="append", default=[], metavar="PREFIX",
                   help="transparent mode: intercept only these client prefixes (repeatable)")
    g.add_argument("--no-client-mptcp", action="store_true", help="listen with plain TCP")
    g.add_argument("--no-syn-recorder", action="store_true",
                   help="explicit mode: no tc BPF recorder; every SYN visits the converter to be read (NFQUEUE)")
    g.add_argument("--no-server-mptcp", action="store_true", help="connect to servers with plain TCP")
    g.add_argument("--server-mptcp-retry", type=float, default=SafetyConfig.server_mptcp_retry, metavar="SECONDS",
                   help="a server that answered without MPTCP gets plain TCP sockets (cheaper than an MPTCP "
                        f"socket that falls back) for this long, then MPTCP is tried again (default {SafetyConfig.server_mptcp_retry:g}; "
                        "0: always try)")
    g.add_argument("--syn-path", choices=("auto", "hold", "accept"), default=ListenerConfig.syn_path,
                   help="hold: every client SYN waits until the server answered (the paper; refusals are RSTs "
                        "to the SYN); accept: the kernel answers at once and the server is connected after "
                        "accept(); auto (default): hold while under the pending caps, past them accept "
                        "(a spoofed SYN flood then meets SYN cookies, not server connections)")
    g.add_argument("--hold-rate", type=int, default=ListenerConfig.hold_rate, metavar="N",
                   help="auto: at most N SYNs/s per client /24 (per worker) are held; the others are answered "
                        f"by the kernel at once (default {ListenerConfig.hold_rate})")
    g.add_argument("--pending-limit", type=int, default=ListenerConfig.pending_limit, metavar="N",
                   help=f"SYNs held at once, per worker (default {ListenerConfig.pending_limit})")
    g.add_argument("--pending-per-prefix", type=int, default=ListenerConfig.pending_per_prefix, metavar="N",
                   help=f"SYNs held at once from one client /24 (default {ListenerConfig.pending_per_prefix})")
    g.add_argument("--pending-per-address", type=int, default=ListenerConfig.pending_per_address, metavar="N",
                   help="... and from one client address: one host cannot take its whole prefix's share "
                        f"(default {ListenerConfig.pending_per_address})")
    g.add_argument("--spare-sockets", type=int, default=ListenerConfig.spare_sockets, metavar="N",
                   help="server sockets made ahead while the converter is idle, per kind (TCP, MPTCP), so that a "
                        f"held SYN costs one connect() (default {ListenerConfig.spare_sockets}; 0: none)")
    g.add_argument("--source-address", action="append", default=[], metavar="ADDR",
                   help="server connections come from this address of the host (repeatable: in turn, as HAProxy's "
                        "`source` and nginx's `proxy_bind`). Each source address has its own local ports towards "
                        "one server (net.ipv4.ip_local_port_range): static mode's one upstream needs several "
                        "for more connections than one range holds (default: the route's address)")
    g.add_argument("--busy-poll", type=int, default=ListenerConfig.busy_poll_us, metavar="USEC",
                   help="after its last event a worker polls instead of sleeping for USEC microseconds: no "
                        "wake-up on the next packet (costly on VMs), at the price of a busy core (default 0)")
    g.add_argument("--health-port", type=int, metavar="PORT",
                   help="also accept (and at once close) plain TCP connections on PORT while serving: a load "
                        "balancer's health check; closed first on SIGTERM, so the balancer drops this converter "
                        "while its connections drain")
    g.add_argument("--queue-num", type=int, default=ListenerConfig.queue_num,
                   help=f"NFQUEUE number for held SYNs (default {ListenerConfig.queue_num}; N workers use "
                        "QUEUE_NUM..QUEUE_NUM+N-1)")
    g = r.add_argument_group("data path and memory")
    g.add_argument("--engine", choices=ENGINES, default=BufferConfig.engine,
                   help="auto (default): copy through one buffer per worker for a direction's first 256 KB, "
                        "then splice; splice: always socket->pipe->socket, no copy through user space; "
                        "copy: always recv()/send(); uring: recv/send through an io_uring ring with "
                        "provided buffers, the loop waiting on the ring (native/core/engine_uring.c)")
    g.add_argument("--uring-buffers", type=int, default=BufferConfig.uring_buffers, metavar="N",
                   help="engine uring: provided buffers per worker, each min(pipe size, 64K), shared by its "
                        f"connections (a power of two, default {BufferConfig.uring_buffers}); a recv that finds "
                        "none free reads into its connection's own buffer")
    g.add_argument("--pipe-size", default=str(BufferConfig.pipe_size),
                   help=f"pipe (or copy buffer) per direction (default {BufferConfig.pipe_size >> 10}K)")
    for side in ("client", "server"):
        for buf in ("rcvbuf", "sndbuf"):
            g.add_argument(f"--{side}-{buf}", metavar="BYTES",
                           help=f"cap SO_{buf.upper()} of the {side}-facing socket (e.g. 200K); default: kernel autotuning")
    g.add_argument("--memory-budget", metavar="BYTES",
                   help="memory the connections may hold at rest (default: half of the host's or cgroup's); "
                        "over what a connection holds at rest it gives the connection limit")
    g.add_argument("--max-connections", type=int, help="explicit connection limit (overrides the budget)")
    g = r.add_argument_group("safety")
    g.add_argument("--allow-client", action="append", default=[], metavar="PREFIX",
                   help="clients allowed (repeatable); default: this host's connected subnets")
    g.add_argument("--allow-destination", action="append", default=[], metavar="PREFIX[:PORTS]",
                   help="destinations allowed beyond public unicast (repeatable), e.g. 10.0.0.0/8 or "
                        "192.168.1.0/24:80,443,8000-8080; default: public unicast only, not port 25 "
                        "(private, CGNAT, benchmarking and documentation blocks are refused)")
    g.add_argument("--deny-destination", "--deny", dest="deny", action="append", default=[], metavar="PREFIX[:PORTS]",
                   help="destinations refused (repeatable; checked before --allow-destination); loopback, "
                        "link-local, multicast, 0/8 and this host's addresses are always refused")
    g.add_argument("--connect-timeout", type=float, default=SafetyConfig.connect_timeout,
                   help=f"seconds to reach a server (default {SafetyConfig.connect_timeout:g})")
    g.add_argument("--handshake-timeout", type=float, default=SafetyConfig.handshake_timeout,
                   help="seconds a client may take to complete its handshake once its SYN is released (it may "
                        f"abort it: then its server connection is closed after this long; default {SafetyConfig.handshake_timeout:g})")
    g.add_argument("--silence-timeout", type=float, default=SafetyConfig.silence_timeout,
                   help="convert mode: reset a client connected this long without a byte of its message "
                        f"(default {SafetyConfig.silence_timeout:g})")
    g.add_argument("--idle-timeout", type=float, default=SafetyConfig.idle_timeout,
                   help=f"reset connections idle this long (default {SafetyConfig.idle_timeout:g}; 0: never)")
    g = r.add_argument_group("operation")
    g.add_argument("--stats", metavar="PATH", help="unix socket for `mimbox stats` (default /run/mimbox/PORT.sock)")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="event loops (processes), each on the shared port with SO_REUSEPORT; default 0: one per "
                        "core this process may use (taskset/cpuset respected)")
    g.add_argument("--drain-timeout", type=float, default=Config.drain_timeout,
                   help="on SIGTERM, seconds to let connections finish")
    g.add_argument("--log-level", default=Config.log_level, choices=LOG_LEVELS)
    g.add_argument("--metrics", metavar="[HOST:]PORT",
                   help="serve the counters at http://HOST:PORT/metrics in the Prometheus format (HOST default "
                        "127.0.0.1); off by default")
    g.add_argument("--access-log", default="off", metavar="off|on|N", type=_access_log,
                   help="one log line (logger mimbox.access) per finished connection: client, server, bytes each "
                        "way, duration, how it ended; N: one connection in N; at most 100 lines a second "
                        "(default off)")
    g.add_argument("--user", default=Config.user, metavar="NAME",
                   help=f"after set-up every worker runs as this user with only the capabilities it still needs, "
                        f"no new privileges and a seccomp filter (default {Config.user}, a system user "
                        "./mimbox.sh creates); root: keep every privilege")

    if only_given:
        for act in r._actions:
            if act.dest not in ("help", "config"):
                act.default = argparse.SUPPRESS

    k = sub.add_parser("check-config", help="check a config file: every error with its key and line",
                       description="Read FILE as `mimbox run --config FILE` would; print every error (its key "
                                   "and line) and exit 1, or print the resulting configuration and exit 0.")
    k.add_argument("file", metavar="FILE")

    u = sub.add_parser("unit", help="print a systemd unit for this installation of mimbox",
                       description="The shipped unit (Type=notify, watchdog, reload, capability bounding set) "
                                   "with the path of this mimbox and of the config file: "
                                   "mimbox unit > /etc/systemd/system/mimbox.service")
    u.add_argument("--config", default="/etc/mimbox/mimbox.toml", metavar="FILE")

    c = sub.add_parser("client", help="run a program with its connections redirected through a converter",
                       description="Run COMMAND unchanged; its TCP connections go to the converter with the real "
                                   "destination in DST_OPT (eBPF, scoped to a cgroup of its own).")
    c.add_argument("--via", required=True, action="append", metavar="ADDR:PORT",
                   help="the converter's address; give it twice for its IPv4 and its IPv6 address (same port, "
                        "e.g. --via 10.0.1.2:7000 --via [2001:db8::2]:7000)")
    c.add_argument("--mptcp", action="store_true", help="make the program's sockets MPTCP (LD_PRELOAD shim)")
    c.add_argument("--convert", action="store_true",
                   help="RFC 8803 instead of DST_OPT: each connect() becomes a TCP Fast Open SYN to the converter "
                        "carrying a Convert message (LD_PRELOAD shim; no BPF, no cgroup)")
    c.add_argument("--no-fastopen", action="store_true",
                   help="with --convert: send the Convert message right after the handshake, not in the SYN")
    c.add_argument("--skip", action="append", default=[], metavar="ADDR", help="destinations never redirected")
    c.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")

    d = sub.add_parser("doctor", help="probe the kernel and tools this project needs")
    d.add_argument("--json", action="store_true")
    d.add_argument("--testbed", action="store_true",
                   help="also what the testbed and experiments need (Mininet, link emulation, peers, tools)")

    s = sub.add_parser("stats", help="print a running converter's counters")
    s.add_argument("--port", type=int, default=7000)
    s.add_argument("--path", help="stats socket (default /run/mimbox/PORT.sock)")
    s.add_argument("--connections", action="store_true", help="list open connections too")

    p = sub.add_parser("pm", help="configure the in-kernel MPTCP path manager of this host")
    p.add_argument("--subflows", type=int, default=2, help="max additional subflows per connection")
    p.add_argument("--add-addr-accepted", type=int, default=2, help="max addresses accepted from peers")
    p.add_argument("--signal", action="append", default=[], metavar="ADDR", help="announce ADDR to peers")
    p.add_argument("--subflow", action="append", default=[], metavar="ADDR@DEV",
                   help="open extra subflows from ADDR on DEV")
    p.add_argument("--cluster", metavar="OWN_ADDR", action="append",
                   help="this converter is one of several behind a shared (anycast/ECMP) address: set the C flag "
                        "(net.mptcp.allow_join_initial_addr_port=0, peers never join the shared address) and "
                        "announce OWN_ADDR, this box's unique address, where peers send their joins instead "
                        "(once per family on a dual-stack box)")
    return ap


# flag (argparse dest) -> the config key it sets, and how its text becomes the value
def _not(v):
    return not v


FLAGS = {
    "mode": ("listener.mode", None), "upstream": ("listener.upstream", parse_hostport),
    "intercept": ("listener.intercept_ports", lambda t: _ports(t)),
    "intercept_from": ("listener.intercept_from", tuple),
    "no_client_mptcp": ("listener.client_mptcp", _not), "no_server_mptcp": ("listener.server_mptcp", _not),
    "no_syn_recorder": ("listener.syn_recorder", _not), "queue_num": ("listener.queue_num", None),
    "syn_path": ("listener.syn_path", None), "pending_limit": ("listener.pending_limit", None),
    "pending_per_prefix": ("listener.pending_per_prefix", None), "hold_rate": ("listener.hold_rate", None),
    "pending_per_address": ("listener.pending_per_address", None),
    "spare_sockets": ("listener.spare_sockets", None), "source_address": ("listener.source_addresses", tuple), "busy_poll": ("listener.busy_poll_us", None),
    "health_port": ("listener.health_port", None), "convert_compat": ("listener.convert_compat", None),
    "engine": ("buffers.engine", None), "pipe_size": ("buffers.pipe_size", parse_size),
    "uring_buffers": ("buffers.uring_buffers", None),
    "client_rcvbuf": ("buffers.client_rcvbuf", parse_size), "client_sndbuf": ("buffers.client_sndbuf", parse_size),
    "server_rcvbuf": ("buffers.server_rcvbuf", parse_size), "server_sndbuf": ("buffers.server_sndbuf", parse_size),
    "allow_client": ("safety.allow_clients", tuple), "deny": ("safety.deny_dst", tuple),
    "allow_destination": ("safety.allow_dst", tuple), "memory_budget": ("safety.memory_budget", parse_size),
    "max_connections": ("safety.max_connections", None), "connect_timeout": ("safety.connect_timeout", None),
    "idle_timeout": ("safety.idle_timeout", None), "handshake_timeout": ("safety.handshake_timeout", None),
    "silence_timeout": ("safety.silence_timeout", None),
    "server_mptcp_retry": ("safety.server_mptcp_retry", None),
    "stats": ("stats_path", None), "log_level": ("log_level", None), "access_log": ("access_log_every", None),
    "user": ("user", None), "workers": ("workers", None), "drain_timeout": ("drain_timeout", None),
    "metrics": ("metrics", None),
}


def flag_values(given: dict) -> dict[str, object]:
    """The config keys the given flags set ({'table.key' or 'key': value}); None values are unset."""
    out: dict[str, object] = {}
    if given.get("listen") is not None:
        out["listener.addr"], out["listener.port"] = parse_hostport(given["listen"])
    for dest, (key, conv) in FLAGS.items():
        if dest in given and given[dest] is not None:
            out[key] = conv(given[dest]) if conv else given[dest]
    if given.get("convert_cookie_file") or given.get("convert_cookie"):
        out["listener.convert_cookie"] = _cookie(given)
    return out


def config_from_args(a: argparse.Namespace, given: dict | None = None) -> Config:
    """The one place the command line (and its --config file) becomes a Config. `given`: only the
    flags the user gave (they override the file); None: every option of `a` (no file)."""
    from mimbox.converter.stats import default_stats_path
    from mimbox.converter.validation import validate
    from mimbox.ops import configfile
    flags = flag_values(vars(a) if given is None else given)
    path = getattr(a, "config", None)
    if path:
        try:
            cfg = configfile.check(path, flags)
        except configfile.ConfigError as e:
            raise ValueError("the config file has errors:\n  " + "\n  ".join(e.lines())) from None
    else:
        cfg = configfile.build(flags)
    if cfg.stats_path is None:
        cfg = dataclasses.replace(cfg, stats_path=default_stats_path(cfg.listener.port))
    return validate(cfg)


def _access_log(text: str) -> int:
    """--access-log off|on|N -> one line per N connections (0: off)."""
    t = text.strip().lower()
    if t in ("off", "0", "no"):
        return 0
    if t in ("on", "1", "yes", "all"):
        return 1
    try:
        n = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: off, on, or N (one connection in N)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: N must be >= 1")
    return n


def _cookie(given: dict) -> bytes | None:
    """The Convert cookie: from --convert-cookie-file (first line), or --convert-cookie."""
    from mimbox.ops.configfile import read_cookie
    if given.get("convert_cookie_file") and given.get("convert_cookie"):
        raise ValueError("give --convert-cookie-file or --convert-cookie, not both")
    if given.get("convert_cookie_file"):
        return read_cookie(given["convert_cookie_file"])
    return given["convert_cookie"].encode() if given.get("convert_cookie") else None
