"""Load generators on the client host: iperf3 (bulk) and wrk (HTTP, a connection per request)."""
from __future__ import annotations

import json
import re
import shlex

from mimbox.config import hostport


def iperf3(tb, system, server_port: int, seconds: int | None, reverse: bool = False, mptcp: bool = True,
           cpus: str | None = "0", extra: str = "", nbytes: str | None = None) -> dict:
    """Bulk transfer through `system` for `seconds` (or `nbytes`, e.g. '1M'); returns goodput (bit/s)
    and bytes as iperf3 measured them."""
    host, port = system.endpoint(tb, server_port)
    amount = ["-n", nbytes] if nbytes else ["-t", str(max(1, int(seconds)))]  # iperf3: -t 0 is forever
    argv = ["iperf3", "-c", host, "-p", str(port), *amount, "-J", *(["-R"] if reverse else []),
            *shlex.split(extra)]
    argv = system.client_argv(tb, argv, mptcp)
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    out = tb.client.cmd(" ".join(shlex.quote(a) for a in argv))
    try:
        r = json.loads(out[out.index("{"):out.rindex("}") + 1])
    except ValueError:
        raise RuntimeError(f"iperf3 through {system}: {out[-500:]}")
    if "error" in r:
        raise RuntimeError(f"iperf3 through {system}: {r['error']}")
    s = r["end"]["sum_received"]
    return {"goodput_bps": s["bits_per_second"], "bytes": s["bytes"], "seconds": s["seconds"]}


WRK_TIMEOUT = "30s"   # a response slower than wrk's default 2 s (a 1 MB download through a CPU-starved
                      # proxy) is measured as slow, not counted as a failed request


def wrk(tb, system, server_port: int, path: str, seconds: float, connections: int = 40, threads: int = 1,
        mptcp: bool = True, cpus: str | None = "0") -> dict:
    """HTTP GETs with `Connection: close` (a new connection per request); returns req/s and errors
    (socket_errors, and by kind: connect, read, write, timeout)."""
    host, port = system.endpoint(tb, server_port)
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", WRK_TIMEOUT,
            "-H", "Connection: close", f"http://{hostport(host, port)}{path}"]
    argv = system.client_argv(tb, argv, mptcp)
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    out = tb.client.cmd(" ".join(shlex.quote(a) for a in argv))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"wrk through {system}: {out[-800:]}")
    total = re.search(r"(\d+) requests in", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    kinds = dict(zip(("connect", "read", "write", "timeout"), map(int, errs.groups()))) if errs else {}
    return {"req_per_s": float(m.group(1)), "requests": int(total.group(1)) if total else 0,
            "socket_errors": sum(kinds.values()),
            **{f"socket_errors_{k}": kinds.get(k, 0) for k in ("connect", "read", "write", "timeout")},
            "non_2xx": int(non2xx.group(1)) if non2xx else 0}
