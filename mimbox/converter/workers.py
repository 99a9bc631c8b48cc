"""One event loop per core: a supervisor and its forked workers.

Each worker is a full Relay with its own epoll loop, its own SO_REUSEPORT listener(s) and its own
NFQUEUE. The SYN-holding rules split client SYNs over the workers' queues by the low byte of the
client's source port (mimbox.host.netfilter.worker_of_port), so the worker that connects to the server
is known from the client's address alone. The kernel's reuseport hash, which user space cannot
predict (SO_ATTACH_REUSEPORT_CBPF is refused on MPTCP listeners), may hand the accepted socket to
another worker: it passes it to the owner over a unix socket (SCM_RIGHTS, native/core/accept.c).

The supervisor forks the workers, installs the rules once all of them listen, serves the summed
counters at the stats socket (each worker serves its own at PATH.wN) and at /metrics
(mimbox.converter.metrics), and on SIGTERM/SIGINT removes the rules and lets every worker drain. If a worker
dies, the others are stopped and the supervisor exits non-zero, so a service manager restarts the
whole converter.

Each worker has a control channel to the supervisor (a SOCK_SEQPACKET pair): liveness pings,
answered from the worker's event loop, and reloads. Under systemd (Type=notify) the supervisor
says READY=1 once rules, BPF and listeners are up, RELOADING=1/READY=1 around a reload, STOPPING=1
at drain, and pings the watchdog (WatchdogSec=) only while every worker answers its pings.
SIGHUP re-reads the config file: what may change in place (mimbox.config.RELOADABLE) is sent
to every worker; a change that needs a restart is refused, naming the key, and the old
configuration stays.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import pickle
import select
import signal
import socket
import time

from mimbox.config import Config
from mimbox.converter.service import Notifier, watchdog_period
from mimbox.converter.stats import answer, counters_path, merge, open_endpoint, query, worker_stats_path
from mimbox.converter.validation import validate
from mimbox.host import privileges
from mimbox.host.resources import MemoryPressure

log = logging.getLogger("mimbox")

READY_TIMEOUT = 30.0
RELOAD_TIMEOUT = 10.0       # every worker applies a reload within this, or it is undone


def default_workers() -> int:
    """One worker per core this process may run on (taskset/cpuset respected)."""
    return len(os.sched_getaffinity(0))


def describe_exit(status: int) -> str:
    """A worker's exit status in words (os.waitstatus_to_exitcode: negative = killed by that signal)."""
    if status >= 0:
        return f"status {status}"
    sig = signal.Signals(-status)
    if sig == signal.SIGSYS:
        return "killed by SIGSYS: a system call its seccomp filter forbids (mimbox.host.privileges.KILL)"
    return f"killed by {sig.name}"


class Supervisor:
    """Fork `workers` relays for `cfg`, own their rules and stats endpoint; `run()` until stopped."""

    def __init__(self, cfg: Config, workers: int, drain_timeout: float | None = None, reload=None):
        """reload: () -> Config, the configuration read again (SIGHUP); None: nothing to re-read."""
        from mimbox.converter.synpath import Admission, HeldSet
        self.cfg, self.workers = validate(cfg), workers
        self.drain_timeout = cfg.drain_timeout if drain_timeout is None else drain_timeout
        self.reload_source = reload
        self.reload_wanted = False
        self.controls: dict[int, socket.socket] = {}     # worker -> the supervisor's end of its channel
        self.notify = Notifier()
        self.watchdog = watchdog_period()
        self.ping_round, self.answered, self.next_ping = 0, set(), 0.0
        self.metrics = None
        self.held = HeldSet()       # shared: which worker holds which SYN
        self.plan = None     # made in run(): the BPF recorder's map fd is inherited by the workers
        self.rules = None
        self.admission = Admission(cfg.connection_limit(), shared=True)
        self.pressure = MemoryPressure(self.admission)   # checked once a second, for every worker
        self.children: dict[int, int] = {}     # pid -> worker index
        self.stats_sock: socket.socket | None = None
        self.stopping = False

    # -- workers -----------------------------------------------------------------------------------------
    def _fork_workers(self) -> int:
        """Fork the workers; return the read end of the pipe on which each says it is listening."""
        pairs = {(i, j): socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                 for i, j in itertools.combinations(range(self.workers), 2)}
        controls = {w: socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for w in range(self.workers)}
        ready_r, ready_w = os.pipe()
        supervisor = os.getpid()
        try:
            for w in range(self.workers):
                pid = os.fork()
                if pid == 0:                                   # the worker
                    privileges.die_with(supervisor)
                    os.close(ready_r)
                    for v, (a, b) in controls.items():
                        a.close()
                        if v != w:
                            b.close()
                    links = {}
                    for (i, j), (a, b) in pairs.items():
                        if w == i:
                            links[j] = a
                            b.close()
                        elif w == j:
                            links[i] = b
                            a.close()
                        else:
                            a.close()
                            b.close()
                    os._exit(self._worker(w, links, ready_w, controls[w][1]))
                self.children[pid] = w
        finally:
            for a, b in pairs.values():
                a.close()
                b.close()
            for w, (a, b) in controls.items():
                b.close()
                a.setblocking(False)
                self.controls[w] = a
            os.close(ready_w)
        return ready_r

    def _worker(self, w: int, links: dict[int, socket.socket], ready_w: int, control: socket.socket) -> int:
        from mimbox.converter.relay import Relay
        for h in logging.getLogger().handlers:
            h.setFormatter(logging.Formatter(f"%(asctime)s mimbox[w{w}] %(levelname)s %(message)s"))
        # while starting, Ctrl-C (sent to the whole process group) is the supervisor's to handle;
        # once serving, SIGINT and SIGTERM both make the worker drain; a reload comes over `control`
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        control.setblocking(False)
        try:
            cfg = dataclasses.replace(self.cfg, stats_path=worker_stats_path(self.cfg.stats_path, w)
                                      if self.cfg.stats_path else None)
            drop = self.cfg.user != "root"
            with Relay(cfg, worker=w, workers=self.workers, links=links, admission=self.admission,
                       plan=self.plan, held=self.held, keeper_later=drop, control=control) as relay:
                if drop:          # set-up done: the service user, the capabilities left, seccomp
                    privileges.drop(self.cfg.user, privileges.needed_capabilities(self.plan.queue))
                    relay.keep()  # the keeper inherits all of it
                os.write(ready_w, b"r")
                os.close(ready_w)
                ready_w = -1
                relay.serve(drain_timeout=self.drain_timeout)
            return 0
        except BaseException as e:
            from mimbox.converter.startup import debug_enabled, explain
            why = explain(e, self.cfg, w) if ready_w >= 0 else None
            if why is None or debug_enabled():
                log.exception("worker %d failed", w)
            if ready_w >= 0:              # still starting: the supervisor says why, in one line
                os.write(ready_w, b"E" + (why or f"worker {w} failed: {e!r}").encode()[:400].replace(b"\n", b" ")
                         + b"\n")
            return 1

    def _wait_ready(self, ready_r: int) -> None:
        """Each worker writes b"r" once it serves, or b"E<one line>\n" if it could not start."""
        got, deadline, buf = 0, time.monotonic() + READY_TIMEOUT, b""
        try:
            while got < self.workers:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([ready_r], [], [], left)[0]:
                    raise RuntimeError(f"only {got} of {self.workers} workers started in {READY_TIMEOUT:g}s")
                data = os.read(ready_r, 1024)
                if not data:
                    raise RuntimeError(f"a worker exited while starting ({got} of {self.workers} ready)")
                buf += data
                while buf[:1] == b"r":
                    got, buf = got + 1, buf[1:]
                if buf[:1] == b"E" and b"\n" in buf:
                    from mimbox.converter.startup import StartupError
                    raise StartupError(buf[1:buf.index(b"\n")].decode(errors="replace"))
        finally:
            os.close(ready_r)

    def _stop_workers(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            except PermissionError:       # workers run as another user: signalling them takes CAP_KILL
                log.error("cannot signal worker pid %d (run as %s): the supervisor needs CAP_KILL", pid, self.cfg.user)
        deadline = time.monotonic() + self.drain_timeout + 5
        while self.children and time.monotonic() < deadline:
            self._reap(block_for=0.1)
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (PermissionError, ChildProcessError):
                pass
        self.children.clear()

    def _reap(self, block_for: float = 0.0) -> list[tuple[int, int]]:
        """Collect exited workers: [(worker, exit status)]."""
        gone = []
        end = time.monotonic() + block_for
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return gone
            if pid == 0:
                if gone or time.monotonic() >= end:
                    return gone
                time.sleep(0.02)
                continue
            if pid in self.children:
                gone.append((self.children.pop(pid), os.waitstatus_to_exitcode(status)))

    # -- stats ---------------------------------------------------------------------------------------------
    def worker_snapshots(self, timeout: float = 2.0, counters_only: bool = False) -> list[tuple[int, dict | None]]:
        """Each worker's counters (None: it did not answer within `timeout`); counters_only: from
        its counters-only endpoint, without the connection list (/metrics)."""
        out = []
        for w in range(self.workers):
            path = worker_stats_path(self.cfg.stats_path, w)
            try:
                out.append((w, query(counters_path(path) if counters_only else path, timeout=timeout)))
            except (OSError, ValueError):
                out.append((w, None))
        return out

    def snapshot(self) -> dict:
        """The workers' counters, summed (a worker that does not answer is named in `unanswered`)."""
        snaps = self.worker_snapshots()
        return merge([s for _, s in snaps if s is not None], workers=self.workers,
                     unanswered=[w for w, s in snaps if s is None])

    def _serve_stats(self) -> None:
        answer(self.stats_sock, self.snapshot, timeout=3.0)

    # -- control channels: liveness and reloads ----------------------------------------------------------
    def _on_control(self, w: int) -> None:
        """A worker's answer to a ping (reload answers are read by _reload itself)."""
        try:
            msg = self.controls[w].recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            msg = b""
        if msg == b"P%d" % self.ping_round:
            self.answered.add(w)
            if len(self.answered) == self.workers:
                self.notify("WATCHDOG=1")     # every worker's loop turned since the last ping

    def _ping(self, now: float) -> None:
        """Ask every worker whether its loop turns; the watchdog is fed when all have answered."""
        self.ping_round += 1
        self.answered = set()
        self.next_ping = now + self.watchdog
        for sock in self.controls.values():
            try:
                sock.send(b"P%d" % self.ping_round)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass                  # a full channel misses a ping; a dead worker is reaped

    def _reload(self) -> bool:
        """SIGHUP: read the configuration again; apply what may change in place to every worker (new
        connections get it, established ones carry on); refuse the rest, naming each key. True if
        the new configuration is in force."""
        from mimbox.config import changes
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        try:
            if self.reload_source is None:
                log.warning("SIGHUP: nothing to reload (started without --config)")
                return False
            try:
                new = self.reload_source()
            except ValueError as e:
                log.error("reload refused, the configuration in force stays: %s", e)
                return False
            live, fixed = changes(self.cfg, new)
            if fixed:
                log.error("reload refused, the configuration in force stays: %s cannot change while running "
                          "(restart to change %s)", ", ".join(fixed), "it" if len(fixed) == 1 else "them")
                return False
            if not live:
                log.info("reload: nothing changed")
                return True
            failed = self._send_config(new)
            if failed:
                log.error("reload refused, the configuration in force stays: %s", "; ".join(failed))
                self._send_config(self.cfg)       # undo it where it was applied
                return False
            self.cfg = new
            self.drain_timeout = new.drain_timeout
            logging.getLogger().setLevel(new.log_level.upper())
            log.info("reloaded: %s", ", ".join(live))
            return True
        finally:
            self.notify("READY=1")

    def _send_config(self, cfg: Config) -> list[str]:
        """Send `cfg` to every worker and wait for each answer; what went wrong, per worker. The
        default allowed clients (this host's subnets) are read here: a confined worker may not open
        a netlink socket (mimbox.host.privileges)."""
        if not cfg.safety.allow_clients:
            from mimbox.config import local_subnets
            from mimbox.converter.safety import collapsed
            cfg = dataclasses.replace(cfg, safety=dataclasses.replace(
                cfg.safety, allow_clients=tuple(collapsed(local_subnets()))))
        payload = b"C" + pickle.dumps(cfg)
        waiting, failed = set(), []
        for w, sock in self.controls.items():
            try:
                sock.setblocking(True)
                sock.settimeout(RELOAD_TIMEOUT)
                sock.send(payload)
                waiting.add(w)
            except OSError as e:
                failed.append(f"worker {w}: {e}")
        deadline = time.monotonic() + RELOAD_TIMEOUT
        for w in sorted(waiting):
            sock = self.controls[w]
            while True:
                try:
                    sock.settimeout(max(0.01, deadline - time.monotonic()))
                    msg = sock.recv(4096)
                except OSError:
                    failed.append(f"worker {w} did not answer within {RELOAD_TIMEOUT:g}s")
                    break
                if msg[:1] == b"P":           # a ping's late answer
                    continue
                if msg[:1] != b"K":
                    failed.append(f"worker {w}: {msg[1:].decode(errors='replace') or 'gone'}")
                break
        for sock in self.controls.values():
            sock.setblocking(False)
        return failed

    def _start_metrics(self) -> None:
        if self.cfg.metrics:
            from mimbox.converter.metrics import MetricsProcess
            self.metrics = MetricsProcess(self.cfg.metrics, self.cfg.user)

    def _on_metrics(self) -> None:
        """The metrics process asks for the workers' counters (mimbox.converter.metrics)."""
        self.metrics.asked(lambda: self.worker_snapshots(counters_only=True))

    # -- the supervisor's life -----------------------------------------------------------------------
    def run(self, on_ready=None) -> int:
        """Start the workers, install the rules, serve stats until SIGTERM/SIGINT; 0 on a clean stop."""
        def stop(*_):
            self.stopping = True

        def hup(*_):
            self.reload_wanted = True
        from mimbox.converter.synplan import listener_rules, plan_syns
        code = 0
        old_hup = signal.signal(signal.SIGHUP, hup)      # a reload while starting waits for the loop
        try:
            self.plan = plan_syns(self.cfg)
            self.rules = listener_rules(self.cfg, self.plan, self.workers)
            ready_r = self._fork_workers()
            old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
            self._wait_ready(ready_r)
            self.rules.install()
            if self.cfg.stats_path:
                self.stats_sock = open_endpoint(self.cfg.stats_path)
            self._start_metrics()
            if self.cfg.user != "root":       # serving: only what stopping needs (mimbox.host.privileges)
                from mimbox.host import privileges
                privileges.keep_only(privileges.SUPERVISOR_CAPABILITIES)
            if on_ready:
                on_ready()
            self.notify("READY=1", f"STATUS=serving on {self.cfg.listener.addr}:{self.cfg.listener.port} "
                                   f"with {self.workers} worker{'s' * (self.workers > 1)}", f"MAINPID={os.getpid()}")
            tick = min(0.5, self.watchdog / 4) if self.watchdog else 0.5
            next_check = 0.0
            while not self.stopping:
                now = time.monotonic()
                if self.watchdog and now >= self.next_ping:
                    self._ping(now)
                if now >= next_check:
                    self.pressure.check()
                    next_check = now + 1.0
                if self.reload_wanted:
                    self.reload_wanted = False
                    self._reload()
                socks = [self.stats_sock] if self.stats_sock else []
                if self.metrics is not None:
                    socks.append(self.metrics)
                try:
                    ready = select.select(socks + list(self.controls.values()), [], [], tick)[0]
                except InterruptedError:
                    continue
                for sock in ready:
                    if sock is self.stats_sock:
                        self._serve_stats()
                    elif sock is self.metrics:
                        self._on_metrics()
                    else:
                        self._on_control(next(w for w, c in self.controls.items() if c is sock))
                for w, status in self._reap():
                    if self.stopping and status == 0:      # the signal reached the workers too (Ctrl-C)
                        log.info("worker %d drained", w)
                        continue
                    log.error("worker %d exited (%s): stopping the converter", w, describe_exit(status))
                    code = 1
                    self.stopping = True
            self.notify("STOPPING=1", "STATUS=draining")
            log.info("stopping: no new connections, %d workers draining", len(self.children))
            for s, h in old.items():
                signal.signal(s, h)
        finally:
            signal.signal(signal.SIGHUP, old_hup)
            if self.rules is not None:
                self.rules.remove()       # new SYNs meet a closed port from now on
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self._stop_workers()
            for sock in self.controls.values():
                sock.close()
            self.controls = {}
            if self.plan is not None:
                self.plan.close()
            if self.stats_sock is not None:
                self.stats_sock.close()
            if self.cfg.stats_path:       # the workers' endpoints too: they may no longer remove them
                for path in [self.cfg.stats_path, *(p for w in range(self.workers) for p in (
                        worker_stats_path(self.cfg.stats_path, w), counters_path(worker_stats_path(self.cfg.stats_path, w))))]:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass                  # never made, or removed already
        return code
