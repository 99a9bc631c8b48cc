"""The converter's listener: set-up, rules, and the Python side of its event loop. Every SYN and
every connection is served by the core (mimbox.converter.core, native/core/):

A held SYN, as in the paper (§3, Table 1), while the SYN path lets it (docs/running.md "SYN path"):
  1. the client's SYN reaches NFQUEUE (rules in mimbox.host.netfilter) and is held by the core;
  2. its destination: DST_OPT (explicit), the address TPROXY kept (transparent), or static;
     the policy may refuse it -> the SYN is released marked, and the kernel answers RST;
  3. the core connects to the server at once (MPTCP socket, plain TCP on fallback);
     refused/unreachable -> the client gets RST, never an accepted connection that then closes;
  4. established -> the SYN is released to the listener, the kernel completes the client handshake;
  5. accept() pairs the client socket with its server socket.
A SYN not held (past --hold-rate or the pending caps, or --syn-path accept) is answered by the
kernel; at accept() the destination comes from the SYN's DST_OPT if the core saw it, the BPF
recorder (explicit: mimbox.host.synrecord), TPROXY or the configuration; the policy is checked and the
server connected; a failure resets the client before any byte is relayed.

Then the core moves bytes both ways (copy, then splice for bulk), turns each direction's EOF into
a shutdown(SHUT_WR) on the other side and a reset on one side into a reset on the other, and closes
both when both are done. Python keeps convert mode's messages (mimbox.converter.convert), the
hand-over between workers, log lines, stats and health probes.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import time

from mimbox.codes import CAUSES, EV_ABORTED, EV_ACCEPTED, EV_CLOSED, EV_FD, EV_GIVEBACK, EV_REFUSED, PIPE_POOL
from mimbox.config import Config, hostport, static_upstream
from mimbox.converter.core import Core, addr_of
from mimbox.converter.greetings import Greetings
from mimbox.converter.layouts import ETIME, CoreConfig
from mimbox.converter.safety import AddressWatch, Policy
from mimbox.converter.sockets import answer_health, health_listener, listener, route_dump_socket
from mimbox.converter.stats import Answers, Stats, counters_path, open_endpoint, worker_snapshot
from mimbox.converter.synpath import AccessLog, Admission, Cause, HeldSet, RefusalLog, refusal_reason
from mimbox.converter.synplan import SynPlan, core_config, listener_rules, plan_syns
from mimbox.converter.timers import Timeouts
from mimbox.converter.validation import validate
from mimbox.host import privileges
from mimbox.host.resources import MemoryPressure, check_sources, limit_line, raise_fd_limit
from mimbox.host.synrecord import SynRecorder
from mimbox.wire import addrs

log = logging.getLogger("mimbox")

class Relay:
    """One listener: its set-up, and the Python side of its event loop. `serve()` runs until
    SIGTERM/SIGINT, then drains. The core (mimbox.converter.core) holds SYNs, accepts, connects and relays;
    this class sets it up and answers what it hands back: convert mode's messages, refusals to
    log, stats and health probes.

    Alone (workers=1) it owns its netfilter rules. As one of several workers (mimbox.converter.workers) it
    holds the SYNs of its share of source ports (queue_num + worker), listens with SO_REUSEPORT, and
    its core passes a connection the kernel gave it but whose SYN another worker held to that
    worker over `links` (SCM_RIGHTS); the supervisor owns the rules.
    """

    def __init__(self, cfg: Config, worker: int = 0, workers: int = 1,
                 links: dict[int, socket.socket] | None = None, admission: Admission | None = None,
                 plan: SynPlan | None = None, held: HeldSet | None = None, keeper_later: bool = False,
                 control: socket.socket | None = None):
        """plan: the supervisor's (it owns rules and recorder); None: this relay plans and owns them.
        held: the workers' shared set of held SYNs (None: hand over every connection another worker
        owns by its source port). control: the supervisor's channel (mimbox.converter.workers: liveness pings
        and reloads)."""
        self.cfg = validate(cfg)
        self.worker, self.workers = worker, workers
        self.links = links or {}          # other worker -> a unix datagram socket connected to it
        self.policy = Policy.from_config(cfg.safety, static_upstream(cfg))
        self.admission = admission or Admission(cfg.connection_limit())
        # the admission's owner (a lone relay; else the supervisor) watches the kernel's TCP memory
        self.pressure = MemoryPressure(self.admission) if admission is None else None
        # what this process's RLIMIT_NOFILE lets it hold (all connections may pick one worker)
        self.fds = raise_fd_limit(self.admission.limit, pipes=PIPE_POOL)
        self.fd_capacity = self.fds.connections
        self.stats = Stats()
        self.timeouts = Timeouts.of(cfg.safety)
        self.refusals = RefusalLog(log)
        self.access = AccessLog(logging.getLogger("mimbox.access"))
        self.plan = plan              # made in open() when this relay owns it
        self.owns_plan = plan is None
        self.queue_syns = True
        self.recorder: SynRecorder | None = None
        self.held = held
        self.keeper_later = keeper_later  # True: the caller starts the keeper (after dropping privileges)
        self.greetings = Greetings(self)  # convert mode: accepted clients whose message is on its way
        self.core: Core | None = None    # made in open(): it needs the plan's recorder
        self.stopping = False
        self.signal_fd = -3          # busy polling: the pipe a signal wakes the loop with
        self.rules = None
        self.listeners: list[socket.socket] = []
        self.stats_sock = None
        self.counters_sock = None        # the same counters without the connection list (/metrics)
        self.health_sock: socket.socket | None = None
        self.address_watch: AddressWatch | None = None
        self.own_failed = False          # this host's own destinations could not be listed: all refused
        self.routes = None               # a netlink socket: this host's own destinations, read (own.c)
        self.own_counts = None           # (addresses, local routes) last listed
        self.answers = Answers()          # `mimbox stats` answers on their way
        self.control = control

    def _core_config(self) -> CoreConfig:
        """What the core decides by itself, from the configuration (mimbox.converter.core)."""
        return core_config(self.cfg, worker=self.worker, workers=self.workers, fd_capacity=self.fd_capacity,
                           admission=self.admission, held=self.held, syns_queued=self.queue_syns,
                           recorder_fd=self.recorder.map.fd if self.recorder is not None else -1,
                           synack_fd=self.plan.synack.map.fd if self.plan.synack is not None else -1)

    # -- set-up / teardown ---------------------------------------------------------------------------
    def open(self) -> "Relay":
        """Listen, bind the SYN queue, install the rules; everything is undone by close()."""
        lc, bc = self.cfg.listener, self.cfg.buffers
        try:
            if self.owns_plan:
                self.plan = plan_syns(self.cfg)
                self.rules = listener_rules(self.cfg, self.plan)
            self.queue_syns = self.plan.queue
            self.recorder = self.plan.recorder
            check_sources(lc.source_addresses)
            self.core = Core(self._core_config())
            self.core.policy(self.policy)
            ports = lc.intercept_ports if lc.mode == "transparent" else (lc.port,)
            for port in ports:
                ls = listener(self.cfg, port, self.workers)
                self.listeners.append(ls)
                self.core.listen(ls.fileno())
            if self.queue_syns:
                self.core.queue(lc.queue_num + self.worker)
            for other, link in self.links.items():
                self.core.link(other, link.fileno())
            if lc.health_port:
                self.health_sock = health_listener(self.cfg)
                self.core.watch(self.health_sock.fileno(), select.EPOLLIN)
            if self.cfg.stats_path:
                self.stats_sock = open_endpoint(self.cfg.stats_path)
                self.core.watch(self.stats_sock.fileno(), select.EPOLLIN)
                # counters only (no connection list): what /metrics asks, so a scrape costs the loop little
                self.counters_sock = open_endpoint(counters_path(self.cfg.stats_path))
                self.core.watch(self.counters_sock.fileno(), select.EPOLLIN)
            # netlink route sockets that can read, never change, addresses, routes or links: made
            # without CAP_NET_ADMIN in force, which a SYN-holding worker keeps (mimbox.host.privileges)
            with privileges.without("CAP_NET_ADMIN"):
                self.address_watch = AddressWatch()
                self.routes = route_dump_socket()
            self.core.watch(self.address_watch.fileno(), select.EPOLLIN)
            if self.control is not None:
                self.core.watch(self.control.fileno(), select.EPOLLIN)
            self._refresh_own()          # an address added since the policy was made
            if self.rules is not None:
                self.rules.install()
            if not self.keeper_later:
                self.keep()
        except BaseException:
            self.close()
            raise
        log.info("listening on %s, mode %s, SYN path %s, engine %s, %s -> %s, %s",
                 hostport(lc.addr, lc.port), lc.mode, lc.syn_path, bc.engine, "MPTCP" if lc.client_mptcp else "TCP",
                 "MPTCP" if lc.server_mptcp else "TCP",
                 limit_line(self.admission.limit, self.cfg.memory_limit(), self.fds, self.workers,
                            self.cfg.ports_limit(), self.cfg.upstream_sources()))
        log.info("policy: %s", self.policy.describe())
        up = static_upstream(self.cfg)
        if not self.policy.allow_clients:
            log.error("every connection will be refused: no client is allowed (this host has no subnet; "
                      "--allow-client PREFIX names them)")
        if up is not None:
            why = self.policy.static_refusal(up)
            if why:
                log.error("every connection will be refused: %s", why)
            elif self.worker == 0:
                log.info("static mode: %s allowed as a destination (--upstream; --deny-destination closes it)",
                         hostport(*up))
        return self

    def reconfigure(self, new: Config) -> None:
        """A reload (SIGHUP): what mimbox.config.RELOADABLE names changes for new connections and
        SYNs; established connections carry on. The caller has checked that nothing else changed."""
        new = dataclasses.replace(validate(new), stats_path=self.cfg.stats_path)   # this worker's own
        policy = Policy.from_config(new.safety, static_upstream(new))   # (own destinations: the core's, kept)
        old = self.cfg, self.policy
        try:
            self._apply(new, policy)
        except Exception:
            self._apply(*old)             # the configuration in force stays
            raise
        self.timeouts = Timeouts.of(new.safety)
        logging.getLogger().setLevel(new.log_level.upper())
        log.info("reloaded: policy: %s", self.policy.describe())

    def _apply(self, cfg: Config, policy: Policy) -> None:
        """The connection limit, the core's reloadable fields and its policy, from `cfg`."""
        self.cfg, self.policy = cfg, policy
        self.admission.limit = cfg.connection_limit()
        self.core.reconfigure(self._core_config())
        self.core.policy(policy, reset=True)

    def _on_control(self) -> None:
        """The supervisor asks: b"P" (are you serving? answered from this loop, so a hung loop does
        not answer) or b"C" + a pickled Config (reload; answered b"K" or b"E" + why)."""
        import pickle
        try:
            msg = self.control.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return
        if not msg:                       # the supervisor is gone (die_with_parent kills us too)
            self.core.unwatch(self.control.fileno())
            return
        if msg[:1] == b"P":
            reply = msg
        elif msg[:1] == b"C":
            try:
                self.reconfigure(pickle.loads(msg[1:]))
                reply = b"K"
            except Exception as e:        # noqa: BLE001 - the old configuration stays; the supervisor says why
                reply = b"E" + str(e).encode()[:1000]
        else:
            return
        try:
            self.control.send(reply)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass                  # the supervisor is gone (we go too) or asks again

    def keep(self) -> None:
        """Start the keeper (a crash resets this worker's connections: mimbox.converter.core.Core.keep)."""
        self.core.keep()

    def close(self) -> None:
        """Remove the rules, reset what is still open, release every fd (idempotent)."""
        if self.rules is not None:
            self.rules.remove()
        if self.owns_plan and self.plan is not None:
            self.plan.close()
        if self.core is not None:
            n = self.core.abort_all()     # held SYNs refused, connections reset
            for ev in self.core.sweep():  # (their refusal lines)
                self._on_core_event(ev)
            if n:
                self.stats.errors[Cause.SHUTTING_DOWN.value] += n
                log.info("reset %d connections: %s", n, Cause.SHUTTING_DOWN.value)
        self.greetings.close()
        self.refusals.flush()
        self.access.flush()
        self._close_health()
        self.answers.close()
        if self.address_watch is not None:
            self.address_watch.close()
            self.address_watch = None
        if self.routes is not None:
            self.routes.close()
            self.routes = None
        for s in (*self.listeners, self.stats_sock, self.counters_sock, *self.links.values(), self.control):
            if s is not None:
                s.close()
        if self.stats_sock is not None and self.cfg.stats_path:
            for path in (self.cfg.stats_path, counters_path(self.cfg.stats_path)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.debug("%s: %s", path, e)
        self.counters_sock = None
        self.listeners = []
        self.links = {}
        self.stats_sock = None
        self.control = None
        if self.core is not None:
            self.core.close()
            self.core = None

    def __enter__(self) -> "Relay":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop --------------------------------------------------------------------------------------
    def serve(self, drain_timeout: float = 30.0) -> None:
        """Run until SIGTERM/SIGINT; then stop accepting and drain open connections."""
        def stop(*_):
            self.stopping = True
        old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        wake = self._signal_wakeup()
        try:
            self._loop(lambda: self.stopping)
            self._close_health()         # a balancer stops sending new clients here
            log.info("stopping: no new connections, draining %d", self.core.active())
            if self.rules is not None:
                self.rules.remove()      # new SYNs now meet a closed port (RST)
            for ls in self.listeners:
                self.core.unwatch(ls.fileno())
                ls.close()
            self.listeners = []
            deadline = time.monotonic() + drain_timeout
            self._loop(lambda: not self.core.active() or time.monotonic() > deadline)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if wake is not None:
                signal.set_wakeup_fd(-1)
                self.core.unwatch(wake[0])
                for fd in wake:
                    os.close(fd)
                self.signal_fd = -3

    def _signal_wakeup(self) -> tuple[int, int] | None:
        """A busy-polling core never sleeps in epoll_wait, so a signal does not interrupt it (EINTR):
        the signal writes to a pipe the core watches instead, and the loop wakes at once."""
        if not self.cfg.listener.busy_poll_us:
            return None
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self.core.watch(r, select.EPOLLIN)
        self.signal_fd = r
        return r, w

    def _loop(self, done) -> None:
        run = self.core.run
        sfd = self.stats_sock.fileno() if self.stats_sock else -2
        cfd = self.counters_sock.fileno() if self.counters_sock else -2
        hfd = self.health_sock.fileno() if self.health_sock else -4
        afd = self.address_watch.fileno() if self.address_watch else -5
        kfd = self.control.fileno() if self.control is not None else -6
        next_sweep = time.monotonic() + 1.0
        while not done():
            try:
                events = run(max(1, int((next_sweep - time.monotonic()) * 1000)))
            except InterruptedError:
                continue
            for ev in events:
                try:
                    if ev.kind == EV_FD:
                        fd = ev.fd
                        if fd in self.greetings:
                            self.greetings.readable(fd)
                        elif fd == sfd:
                            self._serve_stats()
                        elif fd == cfd:
                            self._serve_stats(counters_only=True)
                        elif fd == hfd:
                            answer_health(self.health_sock)
                        elif fd in self.answers.out:
                            if not self.answers.writable(fd):
                                pass          # sent and closed (epoll forgets a closed fd)
                        elif fd == afd:
                            if self.address_watch.changed():
                                self._refresh_own()
                        elif fd == self.signal_fd:
                            os.read(fd, 512)      # the signal's handler has run: the loop checks done()
                        elif fd == kfd:
                            self._on_control()
                    else:
                        self._on_core_event(ev)
                except Exception:      # one connection's bug must not stop every other one
                    self._contain(ev)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 1.0

    def _on_core_event(self, ev) -> None:
        """What the core hands over: a client to serve here, or a refusal or reset to log."""
        kind = ev.kind
        addr = addr_of(ev.caddr, ev.cport)
        if kind == EV_ACCEPTED:            # convert mode: its message says where it goes (counted by the core)
            cs = socket.socket(fileno=ev.fd)
            cs.setblocking(False)
            self.greetings.accepted(cs, addr, full=ev.detail)   # detail: the gate's cap it met (GATE_*)
            return
        dst = addr_of(ev.daddr, ev.dport)
        if kind == EV_CLOSED:              # --access-log
            self.access.ended(addr, dst, ev.bytes_up, ev.bytes_down, ev.duration, ev.err)
            return
        if kind == EV_REFUSED:             # counted by the core; the log line is written here
            cause = CAUSES[ev.cause]
            reason = refusal_reason(cause, ev.detail, ev.arg, ev.err, addr[0], dst, self.policy)
            self.refusals.refused(cause, "%s -> %s (%s%s)" % (hostport(*addr), hostport(*dst) if addrs.known(ev.daddr) else "?",
                                                                "after accept: " if ev.after_accept else "", reason))
        elif kind == EV_GIVEBACK:          # convert mode: the client learns why from an Error TLV
            cs = socket.socket(fileno=ev.fd)
            cs.setblocking(False)
            self.greetings.give_back(cs, addr, CAUSES[ev.cause])
        elif kind == EV_ABORTED:
            why = "idle timeout" if ev.err == ETIME else errno.errorcode.get(ev.err, str(ev.err))
            log.info("reset %s -> %s: %s", hostport(*addr), hostport(*dst), why)

    def _contain(self, ev) -> None:
        """An unexpected error while serving an event: log it, count it, end what it belonged to."""
        log.exception("internal error on event %d fd %d", ev.kind, ev.fd)
        self.stats.errors["internal error"] += 1
        self.greetings.drop(ev.fd)

    def _refresh_own(self) -> None:
        """This host's own destinations (the kernel's local routes), read again by the core: never a
        destination. If they cannot be read or held, every destination is refused until they can
        (fail closed), said once."""
        try:
            counts = self.core.own_refresh(self.routes.fileno())
        except OSError as e:
            if not self.own_failed:
                log.error("this host's own addresses could not be listed (%s): every destination is refused "
                          "until they can", e)
            self.own_failed = True
            return
        if self.own_failed:
            log.info("this host's own addresses listed again: serving")
            self.own_failed = False
        if counts != self.own_counts:
            self.own_counts = counts
            log.info("this host's own destinations (never a destination): %d addresses, %d local routes",
                     *counts)

    def _close_health(self) -> None:
        if self.health_sock is not None:
            if self.core is not None:
                self.core.unwatch(self.health_sock.fileno())
            self.health_sock.close()
            self.health_sock = None

    # -- timers and stats --------------------------------------------------------------------------------
    def _sweep(self, now: float) -> None:
        """Once a second: act on what waited too long (mimbox.converter.timers decides it for convert messages;
        the core for held SYNs and connections)."""
        self.greetings.sweep(now)
        if self.pressure is not None:
            self.pressure.check()
        for ev in self.core.sweep():
            self._on_core_event(ev)
        self.answers.expire(now)
        if self.refusals.suppressed and now - self.refusals.window_start >= self.refusals.interval:
            self.refusals.flush()
        if self.access.suppressed and now - self.access.window_start >= self.access.interval:
            self.access.flush()

    def snapshot(self, connections: bool = True) -> dict:
        """The core's counters and this worker's, as one (`mimbox stats`: mimbox.converter.stats.worker_snapshot)."""
        return worker_snapshot(self, connections)

    def _serve_stats(self, counters_only: bool = False) -> None:
        """Answer `mimbox stats` without blocking the loop (mimbox.converter.stats.Answers)."""
        endpoint = self.counters_sock if counters_only else self.stats_sock
        fd = self.answers.accept(endpoint, lambda: self.snapshot(connections=not counters_only), time.monotonic())
        if fd is not None:
            self.core.watch(fd, select.EPOLLOUT | select.EPOLLET)
