"""One event loop per core: a supervisor and its forked workers.

Each worker is a full Relay with its own epoll loop, its own SO_REUSEPORT listener(s) and its own
NFQUEUE. The SYN-holding rules split client SYNs over the workers' queues by the low byte of the
client's source port (mimbox.netfilter.worker_of_port), so the worker that connects to the server
is known from the client's address alone. The kernel's reuseport hash, which user space cannot
predict (and SO_ATTACH_REUSEPORT_CBPF is refused on MPTCP listeners), may hand the accepted socket
to another worker; that worker passes it over a unix socket (SCM_RIGHTS) to the owner, which pairs
it with its server socket.

The supervisor forks the workers, installs the rules once all of them listen, serves the summed
counters at the stats socket (each worker serves its own at PATH.wN), and on SIGTERM/SIGINT removes
the rules and lets every worker drain. If a worker dies, the others are stopped and the
supervisor exits non-zero, so a service manager restarts the whole converter.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import select
import signal
import socket
import time

from mimbox.config import Config
from mimbox.stats import answer, merge, open_endpoint, query, worker_stats_path

log = logging.getLogger("mimbox")

READY_TIMEOUT = 30.0


def default_workers() -> int:
    """One worker per core this process may run on (taskset/cpuset respected)."""
    return len(os.sched_getaffinity(0))


def die_with_parent(parent: int) -> None:
    """A worker must not outlive a killed supervisor: it would hold the port and the queue."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:      # the supervisor died before prctl() took effect
        os._exit(1)


def describe_exit(status: int) -> str:
    """A worker's exit status in words (os.waitstatus_to_exitcode: negative = killed by that signal)."""
    if status >= 0:
        return f"status {status}"
    sig = signal.Signals(-status)
    if sig == signal.SIGSYS:
        return "killed by SIGSYS: a system call its seccomp filter forbids (mimbox.privileges.KILL)"
    return f"killed by {sig.name}"


class Supervisor:
    """Fork `workers` relays for `cfg`, own their rules and stats endpoint; `run()` until stopped."""

    def __init__(self, cfg: Config, workers: int, drain_timeout: float = 30.0):
        from mimbox.synpath import Admission, HeldSet
        self.cfg, self.workers, self.drain_timeout = cfg.validate(), workers, drain_timeout
        self.held = HeldSet()       # shared: which worker holds which SYN
        self.plan = None     # made in run(): the BPF recorder's map fd is inherited by the workers
        self.rules = None
        self.admission = Admission(cfg.connection_limit(), shared=True)
        self.children: dict[int, int] = {}     # pid -> worker index
        self.stats_sock: socket.socket | None = None
        self.stopping = False

    # -- workers -----------------------------------------------------------------------------------------
    def _fork_workers(self) -> int:
        """Fork the workers; return the read end of the pipe on which each says it is listening."""
        pairs = {(i, j): socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
                 for i, j in itertools.combinations(range(self.workers), 2)}
        ready_r, ready_w = os.pipe()
        supervisor = os.getpid()
        try:
            for w in range(self.workers):
                pid = os.fork()
                if pid == 0:                                   # the worker
                    die_with_parent(supervisor)
                    os.close(ready_r)
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
                    os._exit(self._worker(w, links, ready_w))
                self.children[pid] = w
        finally:
            for a, b in pairs.values():
                a.close()
                b.close()
            os.close(ready_w)
        return ready_r

    def _worker(self, w: int, links: dict[int, socket.socket], ready_w: int) -> int:
        from mimbox.relay import Relay
        for h in logging.getLogger().handlers:
            h.setFormatter(logging.Formatter(f"%(asctime)s mimbox[w{w}] %(levelname)s %(message)s"))
        # while starting, Ctrl-C (sent to the whole process group) is the supervisor's to handle;
        # once serving, SIGINT and SIGTERM both make the worker drain
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cfg = dataclasses.replace(self.cfg, stats_path=worker_stats_path(self.cfg.stats_path, w)
                                      if self.cfg.stats_path else None)
            drop = self.cfg.user != "root"
            with Relay(cfg, worker=w, workers=self.workers, links=links, admission=self.admission,
                       plan=self.plan, held=self.held, keeper_later=drop) as relay:
                if drop:          # set-up done: the service user, the capabilities left, seccomp
                    from mimbox import privileges
                    privileges.drop(self.cfg.user, privileges.needed_capabilities(self.plan.queue))
                    relay.keep()  # the keeper inherits all of it
                os.write(ready_w, b"r")
                os.close(ready_w)
                ready_w = -1
                relay.serve(drain_timeout=self.drain_timeout)
            return 0
        except BaseException as e:
            from mimbox.startup import debug_enabled, explain
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
                    from mimbox.startup import StartupError
                    raise StartupError(buf[1:buf.index(b"\n")].decode(errors="replace"))
        finally:
            os.close(ready_r)

    def _stop_workers(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.drain_timeout + 5
        while self.children and time.monotonic() < deadline:
            self._reap(block_for=0.1)
        for pid in self.children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
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
    def snapshot(self) -> dict:
        """The workers' counters, summed (a worker that does not answer is named in `unanswered`)."""
        snaps, missing = [], []
        for w in range(self.workers):
            try:
                snaps.append(query(worker_stats_path(self.cfg.stats_path, w), timeout=2.0))
            except (OSError, ValueError):
                missing.append(w)
        return merge(snaps, workers=self.workers, unanswered=missing)

    def _serve_stats(self) -> None:
        answer(self.stats_sock, self.snapshot, timeout=3.0)

    # -- the supervisor's life -----------------------------------------------------------------------
    def run(self, on_ready=None) -> int:
        """Start the workers, install the rules, serve stats until SIGTERM/SIGINT; 0 on a clean stop."""
        def stop(*_):
            self.stopping = True
        from mimbox.relay import listener_rules, plan_syns
        code = 0
        try:
            self.plan = plan_syns(self.cfg)
            self.rules = listener_rules(self.cfg, self.plan, self.workers)
            ready_r = self._fork_workers()
            old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
            self._wait_ready(ready_r)
            self.rules.install()
            if self.cfg.stats_path:
                self.stats_sock = open_endpoint(self.cfg.stats_path)
            if on_ready:
                on_ready()
            while not self.stopping:
                socks = [self.stats_sock] if self.stats_sock else []
                if select.select(socks, [], [], 0.5)[0]:
                    self._serve_stats()
                for w, status in self._reap():
                    log.error("worker %d exited (%s): stopping the converter", w, describe_exit(status))
                    code = 1
                    self.stopping = True
            log.info("stopping: no new connections, %d workers draining", len(self.children))
            for s, h in old.items():
                signal.signal(s, h)
        finally:
            if self.rules is not None:
                self.rules.remove()       # new SYNs meet a closed port from now on
            self._stop_workers()
            if self.plan is not None:
                self.plan.close()
            if self.stats_sock is not None:
                self.stats_sock.close()
            if self.cfg.stats_path:       # the workers' endpoints too: they may no longer remove them
                for path in [self.cfg.stats_path, *(worker_stats_path(self.cfg.stats_path, w)
                                                    for w in range(self.workers))]:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
        return code
