"""`mimbox run | client | doctor | stats | pm` — the converter's command line."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys

from mimbox.codes import MAX_WORKERS
from mimbox.config import Config, flatten, hostport, parse_hostport
from mimbox.ops.flags import build_parser, config_from_args


def cmd_run(a) -> int:
    from mimbox.converter.startup import preflight
    from mimbox.converter.workers import default_workers
    given = getattr(a, "given", None)
    cfg = config_from_args(a, given)
    if cfg.user != "root":
        from mimbox.host.privileges import user_ids
        user_ids(cfg.user)            # a clear error now, not a worker failing later
    workers = cfg.workers or default_workers()
    if not 1 <= workers <= MAX_WORKERS:
        raise ValueError(f"--workers must be between 1 and {MAX_WORKERS}, not {workers}")
    preflight(cfg, workers)           # root, MPTCP, the port: one line each (mimbox.converter.startup)
    if workers > 1:
        from mimbox.host.kernel import mptcp_reuseport_works
        ok, why = mptcp_reuseport_works() if cfg.listener.client_mptcp else (True, "")
        if not ok:
            raise RuntimeError(f"--workers {workers} needs SO_REUSEPORT on MPTCP listeners ({why}); use --workers 1")
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s mimbox %(levelname)s %(message)s")
    reload = (lambda: config_from_args(a, given)) if a.config else None     # SIGHUP: the file read again
    if cfg.listener.mode == "convert":
        from mimbox.converter.convert import fastopen_server
        with fastopen_server():       # SYN data is ignored unless the namespace's TFO server side is on
            return _serve(cfg, workers, reload)
    return _serve(cfg, workers, reload)


def _serve(cfg: Config, workers: int, reload) -> int:
    from mimbox.converter.relay import Relay
    from mimbox.converter.workers import Supervisor

    def ready():
        print(f"mimbox ready on {hostport(cfg.listener.addr, cfg.listener.port)} ({workers} worker{'s' * (workers > 1)})",
              flush=True)
    # a supervisor keeps the rules for workers that drop privileges, and does what a service needs
    # (reload, metrics, systemd's notifications); one process is the lightest way to run as root
    if workers > 1 or cfg.user != "root" or reload or cfg.metrics or os.environ.get("NOTIFY_SOCKET"):
        return Supervisor(cfg, workers, reload=reload).run(on_ready=ready)
    from mimbox.converter.startup import StartupError, debug_enabled, explain
    try:
        relay = Relay(cfg).open()
    except (OSError, ValueError, RuntimeError) as e:
        why = explain(e, cfg, 0)
        if why is None or debug_enabled():
            raise
        raise StartupError(why) from None
    signal.signal(signal.SIGHUP, lambda *_: logging.getLogger("mimbox").warning(
        "SIGHUP: nothing to reload (started without --config)"))
    try:
        ready()
        relay.serve(drain_timeout=cfg.drain_timeout)
    finally:
        relay.close()
    return 0


def cmd_check_config(a) -> int:
    """Every error of the file with its key and line (exit 1), or the configuration it gives (exit 0)."""
    from mimbox.ops import configfile
    try:
        cfg = configfile.check(a.file)
    except configfile.ConfigError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        print(f"mimbox check-config: {len(e.errors)} error{'s' * (len(e.errors) > 1)} in {a.file}", file=sys.stderr)
        return 1
    flat = flatten(cfg)
    flat.pop("listener.convert_cookie", None)
    if cfg.listener.convert_cookie:
        flat["listener.convert_cookie"] = "(set, from the cookie file)"
    print(f"{a.file}: OK")
    for key in sorted(flat):
        print(f"  {key} = {flat[key]!r}")
    return 0


def cmd_unit(a) -> int:
    from mimbox.paths import PACKAGE
    exe = os.path.join(os.path.dirname(sys.executable), "mimbox")
    if not os.access(exe, os.X_OK):
        raise RuntimeError(f"no mimbox script beside {sys.executable}: install the package (pip install) first")
    text = (PACKAGE / "systemd" / "mimbox.service").read_text()
    print(text.replace("/opt/mimbox/bin/mimbox", exe).replace("/etc/mimbox/mimbox.toml", os.path.abspath(a.config)), end="")
    return 0


def cmd_client(a) -> int:
    from mimbox.client.run import run_redirected
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        print("mimbox client: give a command after --", file=sys.stderr)
        return 2
    vias = [parse_hostport(v) for v in a.via]
    six, four = [h for h, _ in vias if ":" in h], [v for v in vias if ":" not in v[0]]
    if len(six) > 1 or len(four) > 1 or len({p for _, p in vias}) > 1:
        print("mimbox client: --via at most once per family, with one port", file=sys.stderr)
        return 2
    via, via6 = four[0] if four else vias[0], six[0] if six else None
    if a.convert:
        from mimbox.client.run import run_converted
        return run_converted(via, cmd, mptcp=a.mptcp, skip=tuple(a.skip), fastopen=not a.no_fastopen, via6=via6)
    return run_redirected(via, cmd, mptcp=a.mptcp, skip=tuple(a.skip), via6=via6)


def cmd_doctor(a) -> int:
    from mimbox.ops.doctor import probe_all
    from mimbox.paths import BUILD
    caps = probe_all(str(BUILD), testbed=a.testbed)
    if a.json:
        print(json.dumps([c.__dict__ for c in caps], indent=2))
    else:
        for c in caps:
            state = "OK" if c.ok else ("MISSING" if c.required else "MISSING (optional)")
            fix = f"  -> {c.fix}" if (not c.ok and c.fix) else ""
            print(f"{c.name:<26} {state:<19} {c.detail}{fix}")
    return 0 if all(c.ok for c in caps if c.required) else 1


def cmd_stats(a) -> int:
    from mimbox.converter.stats import default_stats_path, query
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
    from mimbox.wire.mptcp import setup_path_manager
    subflow = [tuple(x.split("@", 1)) for x in a.subflow]
    for line in setup_path_manager(a.subflows, a.add_addr_accepted, a.signal, subflow, cluster=a.cluster):
        print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "run":                        # the flags given, apart from defaults: they override --config
        a.given = vars(build_parser(only_given=True).parse_args(argv))
    if a.debug:
        os.environ["MIMBOX_DEBUG"] = "1"      # (the workers too)
    try:
        return {"run": cmd_run, "check-config": cmd_check_config, "unit": cmd_unit, "client": cmd_client, "doctor": cmd_doctor, "stats": cmd_stats,
                "pm": cmd_pm}[a.cmd](a)
    except (ValueError, RuntimeError, OSError) as e:
        if a.debug:
            raise
        print(f"mimbox {a.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
