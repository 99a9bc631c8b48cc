"""`mimbox run | client | doctor | stats | pm` — the converter's command line."""
from __future__ import annotations

import argparse
import os
import json
import logging
import sys

from mimbox.config import (
    ENGINES,
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mimbox", description="MiMBox: a Multipath TCP <-> TCP protocol converter.")
    ap.add_argument("--debug", action="store_true", help="tracebacks instead of one-line errors (mimbox --debug run ...)")
    sub = ap.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the converter", description=(
        "Terminate client connections and convert them to server connections, MPTCP <-> TCP. "
        "Client SYNs are held (NFQUEUE) until the server answers, so a refused server gives the "
        "client a RST; bytes are moved with splice(). Run as root on the converter host."))
    g = r.add_argument_group("listener and redirection")
    g.add_argument("--listen", default=f"{ListenerConfig.addr}:{ListenerConfig.port}", metavar="ADDR:PORT",
                   help="where clients connect (explicit/static); in transparent mode its port only names the "
                        "rules and stats socket: one listener per --intercept port takes the connections")
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
    g.add_argument("--upstream", metavar="HOST:PORT", help="static mode: the server")
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
    g.add_argument("--spare-sockets", type=int, default=ListenerConfig.spare_sockets, metavar="N",
                   help="server sockets made ahead while the converter is idle, per kind (TCP, MPTCP), so that a "
                        f"held SYN costs one connect() (default {ListenerConfig.spare_sockets}; 0: none)")
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
                        "copy: always read()/write()")
    g.add_argument("--pipe-size", default=str(BufferConfig.pipe_size),
                   help=f"pipe (or copy buffer) per direction (default {BufferConfig.pipe_size >> 10}K)")
    for side in ("client", "server"):
        for buf in ("rcvbuf", "sndbuf"):
            g.add_argument(f"--{side}-{buf}", metavar="BYTES",
                           help=f"cap SO_{buf.upper()} of the {side}-facing socket (e.g. 200K); default: kernel autotuning")
    g.add_argument("--memory-budget", default=str(SafetyConfig.memory_budget),
                   help="memory the connections may pin; with the buffer caps it gives the connection limit")
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
    g.add_argument("--idle-timeout", type=float, default=SafetyConfig.idle_timeout,
                   help=f"reset connections idle this long (default {SafetyConfig.idle_timeout:g}; 0: never)")
    g = r.add_argument_group("operation")
    g.add_argument("--stats", metavar="PATH", help="unix socket for `mimbox stats` (default /run/mimbox/PORT.sock)")
    g.add_argument("--workers", type=int, default=0, metavar="N",
                   help="event loops (processes), each on the shared port with SO_REUSEPORT; default 0: one per "
                        "core this process may use (taskset/cpuset respected)")
    g.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM, seconds to let connections finish")
    g.add_argument("--log-level", default=Config.log_level, choices=("debug", "info", "warning", "error"))
    g.add_argument("--access-log", default="off", metavar="off|on|N", type=_access_log,
                   help="one log line (logger mimbox.access) per finished connection: client, server, bytes each "
                        "way, duration, how it ended; N: one connection in N; at most 100 lines a second "
                        "(default off)")
    g.add_argument("--user", default=Config.user, metavar="NAME",
                   help=f"after set-up every worker runs as this user with only the capabilities it still needs, "
                        f"no new privileges and a seccomp filter (default {Config.user}, a system user "
                        "./mimbox.sh creates); root: keep every privilege")

    c = sub.add_parser("client", help="run a program with its connections redirected through a converter",
                       description="Run COMMAND unchanged; its TCP connections go to the converter with the real "
                                   "destination in DST_OPT (eBPF, scoped to a cgroup of its own).")
    c.add_argument("--via", required=True, metavar="ADDR:PORT", help="the converter's address")
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
    p.add_argument("--cluster", metavar="OWN_ADDR",
                   help="this converter is one of several behind a shared (anycast/ECMP) address: set the C flag "
                        "(net.mptcp.allow_join_initial_addr_port=0, peers never join the shared address) and "
                        "announce OWN_ADDR, this box's unique address, where peers send their joins instead")
    return ap


def config_from_args(a: argparse.Namespace) -> Config:
    """The one place command-line options become a Config."""
    host, port = parse_hostport(a.listen)
    size = parse_size
    from mimbox.stats import default_stats_path
    return Config(
        listener=ListenerConfig(addr=host, port=port, mode=a.mode,
                                upstream=parse_hostport(a.upstream) if a.upstream else None,
                                intercept_ports=_ports(a.intercept), intercept_from=tuple(a.intercept_from),
                                client_mptcp=not a.no_client_mptcp, server_mptcp=not a.no_server_mptcp,
                                queue_num=a.queue_num, syn_path=a.syn_path, pending_limit=a.pending_limit,
                                pending_per_prefix=a.pending_per_prefix, hold_rate=a.hold_rate,
                                spare_sockets=a.spare_sockets, busy_poll_us=a.busy_poll,
                                health_port=a.health_port, syn_recorder=not a.no_syn_recorder,
                                convert_cookie=_cookie(a)),
        buffers=BufferConfig(client_rcvbuf=size(a.client_rcvbuf), client_sndbuf=size(a.client_sndbuf),
                             server_rcvbuf=size(a.server_rcvbuf), server_sndbuf=size(a.server_sndbuf),
                             pipe_size=size(a.pipe_size), engine=a.engine),
        safety=SafetyConfig(allow_clients=tuple(a.allow_client), deny_dst=tuple(a.deny),
                            allow_dst=tuple(a.allow_destination),
                            memory_budget=size(a.memory_budget), max_connections=a.max_connections,
                            connect_timeout=a.connect_timeout, idle_timeout=a.idle_timeout,
                            handshake_timeout=a.handshake_timeout,
                            server_mptcp_retry=a.server_mptcp_retry),
        stats_path=a.stats or default_stats_path(port), log_level=a.log_level, user=a.user,
        access_log_every=a.access_log,
    ).validate()


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


def _cookie(a) -> bytes | None:
    """The Convert cookie: from --convert-cookie-file (first line), or --convert-cookie."""
    if a.convert_cookie_file and a.convert_cookie:
        raise ValueError("give --convert-cookie-file or --convert-cookie, not both")
    if a.convert_cookie_file:
        try:
            with open(a.convert_cookie_file, "rb") as f:
                text = f.read().splitlines()[0].strip()
        except (OSError, IndexError) as e:
            raise ValueError(f"--convert-cookie-file {a.convert_cookie_file}: cannot read a cookie ({e})") from None
        if not text:
            raise ValueError(f"--convert-cookie-file {a.convert_cookie_file}: empty")
        return text
    return a.convert_cookie.encode() if a.convert_cookie else None


def cmd_run(a) -> int:
    from mimbox.startup import preflight
    from mimbox.workers import default_workers
    cfg = config_from_args(a)
    if cfg.user != "root":
        from mimbox.privileges import user_ids
        user_ids(cfg.user)            # a clear error now, not a worker failing later
    workers = a.workers or default_workers()
    if not 1 <= workers <= 256:
        raise ValueError(f"--workers must be between 1 and 256, not {workers}")
    preflight(cfg, workers)           # root, MPTCP, the port: one line each (mimbox.startup)
    if workers > 1:
        from mimbox.kernel import mptcp_reuseport_works
        ok, why = mptcp_reuseport_works() if cfg.listener.client_mptcp else (True, "")
        if not ok:
            raise RuntimeError(f"--workers {workers} needs SO_REUSEPORT on MPTCP listeners ({why}); use --workers 1")
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s mimbox %(levelname)s %(message)s")
    if cfg.listener.mode == "convert":
        from mimbox.redirect.convert import fastopen_server
        with fastopen_server():       # SYN data is ignored unless the namespace's TFO server side is on
            return _serve(cfg, workers, a)
    return _serve(cfg, workers, a)


def _serve(cfg: Config, workers: int, a) -> int:
    from mimbox.relay import Relay
    from mimbox.workers import Supervisor

    def ready():
        print(f"mimbox ready on {cfg.listener.addr}:{cfg.listener.port} ({workers} worker{'s' * (workers > 1)})",
              flush=True)
    if workers > 1 or cfg.user != "root":     # workers that drop privileges: a supervisor keeps the rules
        return Supervisor(cfg, workers, drain_timeout=a.drain_timeout).run(on_ready=ready)
    from mimbox.startup import StartupError, debug_enabled, explain
    try:
        relay = Relay(cfg).open()
    except (OSError, ValueError, RuntimeError) as e:
        why = explain(e, cfg, 0)
        if why is None or debug_enabled():
            raise
        raise StartupError(why) from None
    try:
        ready()
        relay.serve(drain_timeout=a.drain_timeout)
    finally:
        relay.close()
    return 0


def cmd_client(a) -> int:
    from mimbox.client import run_redirected
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        print("mimbox client: give a command after --", file=sys.stderr)
        return 2
    if a.convert:
        from mimbox.client import run_converted
        return run_converted(parse_hostport(a.via), cmd, mptcp=a.mptcp, skip=tuple(a.skip),
                             fastopen=not a.no_fastopen)
    return run_redirected(parse_hostport(a.via), cmd, mptcp=a.mptcp, skip=tuple(a.skip))


def cmd_doctor(a) -> int:
    from mimbox.kernel import probe_all
    from mimbox.paths import BUILD
    caps = probe_all(str(BUILD))
    if a.json:
        print(json.dumps([c.__dict__ for c in caps], indent=2))
    else:
        for c in caps:
            state = "OK" if c.ok else ("MISSING" if c.required else "MISSING (optional)")
            fix = f"  -> {c.fix}" if (not c.ok and c.fix) else ""
            print(f"{c.name:<26} {state:<19} {c.detail}{fix}")
    return 0 if all(c.ok for c in caps if c.required) else 1


def cmd_stats(a) -> int:
    from mimbox.stats import default_stats_path, query
    path = a.path or default_stats_path(a.port)
    try:
        snap = query(path)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"mimbox stats: no converter answers at {path} (is `mimbox run` running on port {a.port}?)",
              file=sys.stderr)
        return 2
    if not a.connections:
        snap.pop("connections", None)
    print(json.dumps(snap, indent=2))
    return 0


def cmd_pm(a) -> int:
    from mimbox.mptcp import setup_path_manager
    subflow = [tuple(x.split("@", 1)) for x in a.subflow]
    for line in setup_path_manager(a.subflows, a.add_addr_accepted, a.signal, subflow, cluster=a.cluster):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.debug:
        os.environ["MIMBOX_DEBUG"] = "1"      # (the workers too)
    try:
        return {"run": cmd_run, "client": cmd_client, "doctor": cmd_doctor, "stats": cmd_stats,
                "pm": cmd_pm}[a.cmd](a)
    except (ValueError, RuntimeError, OSError) as e:
        if a.debug:
            raise
        print(f"mimbox {a.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
