"""What can sit on the converter host. Every system is started and stopped the same way:

    sys = MiMBox(mode="explicit")
    sys.start(tb, server_port=80)       # on tb.mbox
    argv = sys.client_argv(tb, ["wrk", ...], url_host_port)   # how the client reaches the server through it
    sys.pids()                          # for CPU accounting
    sys.stop()

so an experiment is a loop over systems and parameters, with no special cases per peer.
"""
from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from experiments.measure import cpu_seconds
from mimbox.config import hostport
from mimbox.paths import MPTCPIZE
from topologies.regimes import CpuQuota
from topologies.support import ALLOCATE, NotWithin, wait_until

PY = sys.executable


def mptcp_listeners(argv: list[str], host=None) -> list[str]:
    """An unchanged TCP proxy as an MPTCP <-> TCP converter: its listening sockets (so the connections
    it accepts) become MPTCP through the shim, the connections it opens to the server stay TCP -- as
    MiMBox's and the paper's converters do, and as HAProxy's native `bind mptcp4@` would. host: where
    it runs (the shim's path there; default this machine's)."""
    return ["env", f"LD_PRELOAD={shim(host)}", "MPTCPIZE_LISTEN_ONLY=1", *argv]


def mptcp_everywhere(argv: list[str], host=None) -> list[str]:
    """Every TCP socket of the program MPTCP (what `mptcpize run` does): towards a TCP server its
    connections are MPTCP sockets fallen back to TCP, which receive through a copy (no splice_read)
    and, on this kernel, rarely ended a response early (docs/findings.md)."""
    return ["env", f"LD_PRELOAD={shim(host)}", *argv]


def shim(host=None) -> str:
    """The MPTCP LD_PRELOAD shim's path on `host` (a testbed host; None: this machine)."""
    return getattr(host, "mptcpize", None) or str(MPTCPIZE)


def python(host=None) -> str:
    """The interpreter on `host` that has mimbox and this checkout's experiments (None: this one)."""
    return getattr(host, "python", None) or PY


def write_config(host, tag: str, name: str, text: str) -> tuple[str, str]:
    """A file `name` in a fresh run directory on `host`: (directory, file path)."""
    d = host.mkdtemp(tag)
    path = f"{d}/{name}"
    host.write_file(path, text)
    return d, path


def wait_port(host, port: int, timeout: float = 10.0) -> None:
    """Wait until something on `host` listens on TCP `port` (NotWithin: nothing did in time)."""
    wait_until(lambda: host.cmd(f"ss -Hltn 'sport = :{port}'").strip(), timeout, f"something listens on {host}:{port}",
               every=0.05)


def ready_line(p: subprocess.Popen, timeout: float = 30.0) -> str:
    """The first line a starting process prints, or '' if it prints none within `timeout` or exits."""
    r, _, _ = select.select([p.stdout], [], [], timeout)
    line = p.stdout.readline() if r else ""
    return line.decode(errors="replace") if isinstance(line, bytes) else line


class System:
    """Base: a set of processes on the converter host.

    `box` (a topologies.regimes.CpuQuota, set before start()) is the converter box's CPU: every
    process the system starts, and their children, run inside it, and its usage is the system's CPU
    cost. Each system's stderr goes to a file (`log_path`), so a talkative one never blocks on a pipe."""
    name = "system"
    #: True when the client talks MPTCP to the converter and the converter TCP to the server
    converts = True
    #: how many cores' worth of event loops it runs (a CPU quota scales with it)
    loops = 1

    def __init__(self, cpus: str | None = None):
        self.cpus = cpus           # taskset list for the converter's processes, e.g. "1"
        self.procs: list[subprocess.Popen] = []
        self.host = None
        self.port = None
        self.box: CpuQuota | None = None
        self.log_path = None

    def _popen(self, host, argv: list[str], **kw) -> subprocess.Popen:
        if self.cpus is not None:
            argv = ["taskset", "-c", self.cpus, *argv]
        if self.box is not None:
            argv = self.box.wrap(argv)
        kw.setdefault("stdout", subprocess.PIPE)
        if "stderr" not in kw:
            if self.log_path is None:
                self.log_path = os.path.join(run_dir(self.name.replace("/", "")), "stderr.log")
            with open(self.log_path, "ab") as err:   # the child keeps its own copy
                p = host.popen(argv, stderr=err, **kw)
        else:
            p = host.popen(argv, **kw)
        self.procs.append(p)
        if self.box is not None:
            self.box.admit(p.pid)
        return p

    def log(self) -> str:
        """What the system wrote to stderr so far."""
        if self.log_path is None or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def session_ends(self) -> dict[str, int]:
        """How its abnormally ended sessions ended so far, by the system's own reason (empty for a
        system that does not say)."""
        return {}

    def cpu_s(self) -> float:
        """CPU seconds the system used so far (its box's counter: children and exited ones included)."""
        if self.box is not None:
            return self.box.usage_s()
        return cpu_seconds(self.pids())

    def start(self, tb, server_port: int) -> None:
        """Start on tb.mbox, relaying to tb.server's `server_port`."""
        self.host = tb.mbox

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL); idempotent."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    def pids(self) -> list[int]:
        """PIDs whose CPU time is the converter's cost (children included by the caller)."""
        return [p.pid for p in self.procs if p.poll() is None]

    def endpoint(self, tb, server_port: int) -> tuple[str, int]:
        """Where the client connects."""
        return tb.mbox_client_ip, self.port

    def client_argv(self, tb, argv: list[str], mptcp: bool = True) -> list[str]:
        """The client command, wrapped as this system needs (with the MPTCP shim if `mptcp`)."""
        return mptcp_everywhere(argv, tb.client) if mptcp else list(argv)

    def __repr__(self) -> str:
        return self.name


class Router(System):
    """Plain IP forwarding on the converter host; the server speaks MPTCP (the paper's baseline)."""
    name = "router"
    converts = False

    def endpoint(self, tb, server_port: int) -> tuple[str, int]:
        return tb.server_ip, server_port


# the testbeds' server networks (both families), which the converter must be told it may reach
TESTBED_SERVERS = ("10.0.0.0/8", "fd00::/16")


class MiMBox(System):
    """Our converter, started with `mimbox run` on the converter host."""

    def __init__(self, mode: str = "static", engine: str | None = None, port: int | None = None, extra: list[str] = (),
                 cpus: str | None = None, workers: int | None = None, syn_path: str | None = None,
                 program: list[str] | None = None, listen: str | None = None):
        """workers: None lets `mimbox run` choose (one per CPU it may use: 1 when pinned to one core);
        engine, syn_path: None is the converter's default. program: the `mimbox` command (default
        this checkout's, through this interpreter; e.g. an installed one's script). listen: the
        listening address (default 0.0.0.0, or `::`, which serves both families, when the testbed
        view it starts on has an IPv6 side)."""
        super().__init__(cpus)
        self.program = list(program) if program else None   # None: `mimbox` of the host it runs on
        self.listen = listen
        self.mode, self.engine, self.port, self.extra = mode, engine, port or ALLOCATE.port(), list(extra)
        if "--queue-num" not in self.extra:
            self.extra += ["--queue-num", str(ALLOCATE.queues(workers or os.cpu_count() or 1))]
        if workers is not None:
            self.extra += ["--workers", str(workers)]
        if syn_path is not None:
            self.extra += ["--syn-path", syn_path]
        if engine is not None:
            self.extra += ["--engine", engine]
        self.name = "mimbox" + ("" if mode == "explicit" else f"-{mode}") + (f"-{engine}" if engine else "") \
            + (f"-{syn_path}" if syn_path else "") + (f"-{workers}w" if workers else "")
        self.loops = workers or 1
        self.fastopen = True      # convert mode: the Convert message in the SYN's data (TFO)

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        listen = self.listen or ("::" if 6 in (tb.client_family, tb.server_family) else "0.0.0.0")
        argv = [*self.command(tb.mbox), "run", "--listen", hostport(listen, self.port), "--mode", self.mode,
                "--stats", self.stats_path,
                *self.extra]
        if "--drain-timeout" not in self.extra:
            # connections left at the end of a run (idle keep-alives) may take 5 s to finish, less
            # than stop()'s grace: a converter killed while draining leaves its recorder behind
            argv += ["--drain-timeout", "5"]
        if "--allow-destination" not in self.extra:
            for net in TESTBED_SERVERS:                                # private: refused by default
                argv += ["--allow-destination", net]
        if self.mode == "static":
            argv += ["--upstream", hostport(tb.server_ip, server_port)]
        if self.mode == "transparent":
            argv += ["--intercept", str(server_port)]
        self.proc = self._popen(tb.mbox, argv)
        line = ready_line(self.proc)
        if "ready" not in line:
            self.stop()
            raise RuntimeError(f"mimbox did not start: {line} {self.log()[-2000:]}")

    def command(self, host) -> list[str]:
        """The `mimbox` command on `host` (the one given, else the host's installed one)."""
        return self.program or [python(host), "-m", "mimbox.ops.cli"]

    @property
    def stats_path(self) -> str:
        # one per system: converters of a cluster share a port, in namespaces that share /run
        return f"/run/mimbox/test-{self.port}-{os.getpid()}-{id(self):x}.sock"

    def stats(self) -> dict:
        return self.host.stats(self.stats_path)

    def endpoint(self, tb, server_port: int) -> tuple[str, int]:
        if self.mode == "static":
            return tb.mbox_client_ip, self.port
        if getattr(tb, "client_family", 4) == 6 and ":" not in tb.server_ip:
            # an IPv6 client names an IPv4 server the IPv6 way; its socket is redirected to the
            # converter's IPv6 address (explicit/convert)
            return "::ffff:" + tb.server_ip, server_port
        return tb.server_ip, server_port   # explicit/convert (redirected on the client) and transparent

    def client_argv(self, tb, argv: list[str], mptcp: bool = True) -> list[str]:
        if self.mode in ("explicit", "convert"):
            return [*self.command(tb.client), "client", "--via", hostport(tb.mbox_client_ip, self.port),
                    *(["--convert"] if self.mode == "convert" else []),
                    *(["--no-fastopen"] if self.mode == "convert" and not self.fastopen else []),
                    *(["--mptcp"] if mptcp else []), "--", *argv]
        return super().client_argv(tb, argv, mptcp)


class Command(System):
    """Any converter given as a command line (`./mimbox.sh compare --system NAME='COMMAND'`), run on
    the converter host as every system is: pinned, in its CPU box, its stderr in its log, stopped by
    SIGTERM. Placeholders: {listen_port} (where it must listen; required), {server} and
    {server_port} (where it must relay). The client connects to {listen_port} on the converter, with
    MPTCP sockets, as to a static converter.

        Command("socat", "socat TCP-LISTEN:{listen_port},fork,reuseaddr TCP:{server}:{server_port}")
    """
    PLACEHOLDERS = ("listen_port", "server", "server_port")

    def __init__(self, name: str, command: str, cpus: str | None = None, port: int | None = None):
        import string
        super().__init__(cpus)
        fields = {f for _, f, _, _ in string.Formatter().parse(command) if f is not None}
        unknown = fields - set(self.PLACEHOLDERS)
        if unknown:
            raise ValueError(f"system {name!r}: unknown placeholder(s) {', '.join('{%s}' % f for f in sorted(unknown))}"
                             f" (known: {', '.join('{%s}' % f for f in self.PLACEHOLDERS)})")
        if "listen_port" not in fields:
            raise ValueError(f"system {name!r}: the command must listen on {{listen_port}}")
        self.name, self.command, self.port = name, command, port or ALLOCATE.port()

    def argv(self, tb, server_port: int) -> list[str]:
        import shlex
        return shlex.split(self.command.format(listen_port=self.port, server=tb.server_ip, server_port=server_port))

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        self._popen(tb.mbox, self.argv(tb, server_port), stdout=subprocess.DEVNULL)
        try:
            wait_port(tb.mbox, self.port, timeout=15)
        except NotWithin:
            self.stop()
            raise RuntimeError(f"{self.name} did not listen on {self.port}: {self.log()[-2000:]}") from None


class Naive(System):
    """The paper's read()/write() or splice() converter (experiments/systems/naive.py), static upstream."""

    def __init__(self, engine: str, port: int | None = None, cpus: str | None = None):
        super().__init__(cpus)
        self.engine, self.port = engine, port or ALLOCATE.port()
        self.name = {"readwrite": "read/write", "splice": "splice"}[engine]

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        p = self._popen(tb.mbox, [python(tb.mbox), "-m", "experiments.systems.naive", "--engine", self.engine,
                                  "--listen", str(self.port), "--upstream", f"{tb.server_ip}:{server_port}"])
        if "ready" not in ready_line(p):
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self.log()[-2000:]}")


def run_dir(tag: str) -> str:
    """A private directory for a peer's config, logs and captures; removed when this process exits
    (`invoke clean` removes what a killed run left)."""
    import atexit
    import shutil
    import tempfile
    d = tempfile.mkdtemp(prefix=f"mimbox-run-{tag}-")
    atexit.register(shutil.rmtree, d, True)
    return d


class HAProxy(System):
    """HAProxy 2.6 (Debian), cache-less, splicing; its listener made MPTCP by the LD_PRELOAD shim."""
    SESSION_TAG = "mimbox-session"

    def __init__(self, threads: int = 1, mode: str = "http", port: int | None = None, cpus: str | None = None,
                 server_side: str = "tcp", maxconn: int = 4096):
        """server_side: "tcp" (MPTCP listener only, as every converter here) or "mptcp" (every socket
        through the shim, the server side an MPTCP socket fallen back to TCP). maxconn: HAProxy's
        global limit (two fds each: one process's open-file limit caps it)."""
        self.maxconn = maxconn
        super().__init__(cpus)
        if server_side not in ("tcp", "mptcp"):
            raise ValueError(f"server_side must be tcp or mptcp, not {server_side!r}")
        self.threads, self.mode, self.port, self.server_side = threads, mode, port or ALLOCATE.port(), server_side
        self.loops = threads
        self.name = (f"haproxy-{threads}t" + ("" if mode == "http" else f"-{mode}")
                     + ("" if server_side == "tcp" else "-mptcp-server"))

    def config(self, tb, server_port: int) -> str:
        http = self.mode == "http"
        return "\n".join([
            "global", f"    nbthread {self.threads}", f"    maxconn {self.maxconn}",
            "    tune.maxaccept 64", "    log stderr format raw local0 info",
            "defaults", f"    mode {self.mode}", "    timeout connect 5s", "    timeout client 60s",
            # sessions that end abnormally only (a line each, nothing for the others): their
            # termination state says which side ended them and when (session_ends)
            "    log global", "    option dontlog-normal", f'    log-format "{self.SESSION_TAG} %ts %ci:%cp %B"',
            "    timeout server 60s", "    option splice-auto",
            *(["    option http-server-close"] if http else []),
            "frontend fe", f"    bind {'ipv6@:::' if tb.client_family == 6 else '0.0.0.0:'}{self.port}",
            "    default_backend be",
            "backend be", f"    server s1 {'ipv6@' if ':' in tb.server_ip else ''}{tb.server_ip}:{server_port}", ""])

    def session_ends(self) -> dict[str, int]:
        """HAProxy's abnormal sessions so far by termination state, e.g. {"SD": 1}: the server's side
        died in the data phase; "CD"/"CR": the client closed (wrk does at the end of its run)."""
        counts: dict[str, int] = {}
        for line in self.log().splitlines():
            if line.startswith(self.SESSION_TAG + " "):
                state = line.split()[1]
                counts[state] = counts.get(state, 0) + 1
        return counts

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        _, cfg = write_config(tb.mbox, "haproxy", "haproxy.cfg", self.config(tb, server_port))
        wrap = mptcp_listeners if self.server_side == "tcp" else mptcp_everywhere
        self._popen(tb.mbox, wrap(["haproxy", "-db", "-f", cfg], tb.mbox))
        wait_port(tb.mbox, self.port)


class NginxStream(System):
    """nginx's stream module (Debian's libnginx-mod-stream) as a TCP relay: the proxy an operator would
    put in front of TCP servers, its listener made MPTCP by the shim (nginx has no MPTCP of its own).
    workers > 1: a master and that many worker processes, each with its own listener (reuseport)."""
    MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

    def __init__(self, workers: int = 1, port: int | None = None, cpus: str | None = None,
                 max_connections: int = 19_000):
        """max_connections: each worker's worker_connections (a relayed connection takes two, and each
        worker one fd a connection: one process's open-file limit caps it)."""
        super().__init__(cpus)
        self.workers, self.port, self.max_connections = workers, port or ALLOCATE.port(), max_connections
        self.loops = workers
        self.name = f"nginx-stream-{workers}w"

    def config(self, tb, server_port: int, d: str) -> str:
        v6 = tb.client_family == 6
        listen = f"[::]:{self.port} ipv6only=off" if v6 else f"{self.port}"
        server = f"[{tb.server_ip}]" if ":" in tb.server_ip else tb.server_ip
        return "\n".join([
            f"load_module {self.MODULE};",
            "daemon off;", f"master_process {'on' if self.workers > 1 else 'off'};",
            f"worker_processes {self.workers};", f"pid {d}/nginx.pid;", "error_log stderr warn;",
            f"worker_rlimit_nofile {self.max_connections + 100};",
            f"events {{ worker_connections {self.max_connections}; multi_accept on; }}",
            "stream {",
            f"  server {{ listen {listen} backlog=4096{' reuseport' if self.workers > 1 else ''};",
            f"    proxy_pass {server}:{server_port}; proxy_connect_timeout 5s; proxy_timeout 10m; }}",
            "}", ""])

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        d = tb.mbox.mkdtemp("nginx-stream")
        cfg = f"{d}/nginx.conf"
        tb.mbox.write_file(cfg, self.config(tb, server_port, d))
        self._popen(tb.mbox, mptcp_listeners(["nginx", "-c", cfg, "-p", d], tb.mbox), stdout=subprocess.DEVNULL)
        try:
            wait_port(tb.mbox, self.port, timeout=15)
        except NotWithin:
            self.stop()
            raise RuntimeError(f"{self.name} did not listen on {self.port}: {self.log()[-2000:]}") from None


class Squid(System):
    """Squid 5.7 (Debian) as a reverse proxy with caching off; its listener MPTCP through the shim."""
    name = "squid"

    def __init__(self, port: int | None = None, cpus: str | None = None):
        super().__init__(cpus)
        self.port = port or ALLOCATE.port()

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        d = tb.mbox.mkdtemp("squid")
        tb.mbox.run(f"chmod 777 {d}")                # Squid's own user writes its logs there
        cfg = f"{d}/squid.conf"
        tb.mbox.write_file(cfg, "\n".join([
            f"http_port {self.port} accel defaultsite={tb.server_ip} no-vhost",
            f"cache_peer {tb.server_ip} parent {server_port} 0 no-query originserver name=origin",
            "cache_peer_access origin allow all", "http_access allow all", "cache deny all",
            "cache_mem 0 MB", "memory_pools off", "workers 1", f"pid_filename {d}/squid.pid",
            f"cache_log {d}/cache.log", "access_log none", f"coredump_dir {d}",
            "shutdown_lifetime 1 second", "max_filedescriptors 65536", ""]))
        # a service name of its own: Squid names its shared-memory segments after it, and a killed
        # Squid's segments (/dev/shm) would make the next one with the same name refuse to start
        self._popen(tb.mbox, mptcp_listeners(["squid", "-N", "-n", self.service, "-f", cfg], tb.mbox))
        wait_port(tb.mbox, self.port, timeout=30)

    @property
    def service(self) -> str:
        return f"mimbox{self.port}"

    def stop(self) -> None:
        super().stop()
        if getattr(self.host, "remote", False):
            self.host.cmd(f"rm -f /dev/shm/{self.service}-*")
        else:                      # a Mininet host shares this machine's /dev/shm (and may be stopped)
            import glob
            for seg in glob.glob(f"/dev/shm/{self.service}-*"):
                os.unlink(seg)
