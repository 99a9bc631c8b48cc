"""The converter's listener: set-up, rules, and the Python side of its event loop. Every SYN and
every connection is served by the core (mimbox.core, native/relaycore.c):

A held SYN, as in the paper (§3, Table 1), while the SYN path lets it (docs/running.md "SYN path"):
  1. the client's SYN reaches NFQUEUE (rules in mimbox.netfilter) and is held by the core;
  2. its destination: DST_OPT (explicit), the address TPROXY kept (transparent), or static;
     the policy may refuse it -> the SYN is released marked, and the kernel answers RST;
  3. the core connects to the server at once (MPTCP socket, plain TCP on fallback);
     refused/unreachable -> the client gets RST, never an accepted connection that then closes;
  4. established -> the SYN is released to the listener, the kernel completes the client handshake;
  5. accept() pairs the client socket with its server socket.
A SYN not held (past --hold-rate or the pending caps, or --syn-path accept) is answered by the
kernel; at accept() the destination comes from the SYN's DST_OPT if the core saw it, the BPF
recorder (explicit: mimbox.synrecord), TPROXY or the configuration; the policy is checked and the
server connected; a failure resets the client before any byte is relayed.

Then the core moves bytes both ways (copy, then splice for bulk), turns each direction's EOF into
a shutdown(SHUT_WR) on the other side and a reset on one side into a reset on the other, and closes
both when both are done. Python keeps convert mode's messages (mimbox.redirect.convert), the
hand-over between workers, log lines, stats and health probes.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass

from mimbox import convert, mptcp
from mimbox.config import Config, local_addresses
from mimbox.core import (
    CAUSES,
    DST_EXPLICIT,
    DST_PYTHON,
    DST_STATIC,
    DST_TRANSPARENT,
    ENGINES,
    ETIME,
    EV_ABORTED,
    EV_ACCEPTED,
    EV_FD,
    EV_GIVEBACK,
    EV_CLOSED,
    EV_REFUSED,
    PIPE_POOL,
    SYN_PATHS,
    Core,
    CoreConfig,
    addr_of,
    ip_n,
    port_n,
    syn_error,
)
from mimbox.netfilter import ListenerRules
from mimbox.redirect import convert as converting
from mimbox.safety import AddressWatch, Policy
from mimbox.stats import Answers, Stats, open_endpoint
from mimbox.synpath import AccessLog, Admission, Cause, HeldSet, RefusalLog
from mimbox.synrecord import SynRecorder
from mimbox.timers import PREFIX_WAIT, Timeouts, due

log = logging.getLogger("mimbox")

IP_TRANSPARENT = 19
WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
LINGER_RST = struct.pack("ii", 1, 0)
SPLICE_AFTER = 256 << 10     # engine auto: a direction copies its first bytes, then splices


@dataclass
class SynPlan:
    """How a listener's client SYNs reach it, decided once (by the relay, or by the supervisor for
    all its workers): whether any visits NFQUEUE, at what rate per client /24 (auto), and the BPF
    recorder that tells explicit mode the destination of SYNs that did not."""
    queue: bool
    hold_rate: int | None = None          # None: every SYN that matches is queued
    recorder: SynRecorder | None = None

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None


def plan_syns(cfg: Config) -> SynPlan:
    """hold: every SYN queued and held. accept: none queued, except in explicit mode without the
    BPF recorder (queued only to read DST_OPT, released at once). auto: queued (and held under the
    caps) up to --hold-rate per client /24, the rest straight to the kernel; again every SYN queued
    in explicit mode without the recorder."""
    lc = cfg.listener
    if lc.mode == "convert":
        return SynPlan(queue=False)     # the kernel accepts at the SYN (TFO): the message is the first bytes
    if lc.syn_path == "hold":
        return SynPlan(queue=True)
    recorder = None
    if lc.mode == "explicit" and lc.syn_recorder:
        try:
            recorder = SynRecorder(lc.port).install()
        except (RuntimeError, OSError) as e:
            log.warning("no BPF SYN recorder (%s): every SYN visits the converter to be read", e)
    needs_queue = lc.mode == "explicit" and recorder is None
    if lc.syn_path == "accept":
        return SynPlan(queue=needs_queue, recorder=recorder)
    return SynPlan(queue=True, hold_rate=None if needs_queue else lc.hold_rate, recorder=recorder)


def listener_rules(cfg: Config, plan: SynPlan, workers: int = 1) -> ListenerRules:
    """The netfilter rules a listener of `cfg` needs (installed by the relay, or by the supervisor)."""
    lc = cfg.listener
    return ListenerRules(port=lc.port, queue_num=lc.queue_num, listen_addr=lc.addr,
                         transparent_ports=lc.intercept_ports if lc.mode == "transparent" else (),
                         transparent_from=lc.intercept_from, workers=workers, queue_syns=plan.queue,
                         hold_rate=plan.hold_rate)


MIN_FD_CAPACITY = 16


def raise_fd_limit(connections: int) -> int:
    """Raise RLIMIT_NOFILE for `connections` (two sockets each, pipes pooled); return how many fit.
    Raises RuntimeError if fewer than MIN_FD_CAPACITY fit (e.g. a hard limit of 1024 that this
    process may not raise): a converter that would refuse nearly everyone must not start."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * connections + 2 * PIPE_POOL + 256
    try:
        with open("/proc/sys/fs/nr_open") as f:
            ceiling = int(f.read())
    except OSError:
        ceiling = hard
    target = min(max(want, soft), ceiling)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
    except (ValueError, OSError) as e:
        log.warning("could not raise the open-file limit to %d (%s): it stays %d", target, e, soft)
        target = soft
    fit = (target - 2 * PIPE_POOL - 256) // 2
    if fit < min(MIN_FD_CAPACITY, connections):
        raise RuntimeError(f"the open-file limit ({target}) leaves room for {max(fit, 0)} connections "
                           f"(2 fds each, {2 * PIPE_POOL + 256} reserved): raise it (ulimit -n, LimitNOFILE=) "
                           f"to at least {2 * MIN_FD_CAPACITY + 2 * PIPE_POOL + 256}")
    return max(1, fit)


class Relay:
    """One listener: its set-up, and the Python side of its event loop. `serve()` runs until
    SIGTERM/SIGINT, then drains. The core (mimbox.core) holds SYNs, accepts, connects and relays;
    this class sets it up and answers what it hands back: convert mode's messages, refusals to
    log, stats and health probes.

    Alone (workers=1) it owns its netfilter rules. As one of several workers (mimbox.workers) it
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
        owns by its source port). control: the supervisor's channel (mimbox.workers: liveness pings
        and reloads)."""
        self.cfg = cfg.validate()
        self.worker, self.workers = worker, workers
        self.links = links or {}          # other worker -> a unix datagram socket connected to it
        self.policy = Policy.from_config(cfg.safety)
        self.admission = admission or Admission(cfg.connection_limit())
        # what this process's RLIMIT_NOFILE lets it hold (all connections may pick one worker)
        self.fd_capacity = raise_fd_limit(self.admission.limit)
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
        self.greetings: dict[int, converting.Greeting] = {}     # convert mode: messages on their way
        self.core: Core | None = None    # made in open(): it needs the plan's recorder
        self.stopping = False
        self.signal_fd = -3          # busy polling: the pipe a signal wakes the loop with
        self.rules = None
        self.listeners: list[socket.socket] = []
        self.stats_sock = None
        self.health_sock: socket.socket | None = None
        self.address_watch: AddressWatch | None = None
        self.answers = Answers()          # `mimbox stats` answers on their way
        self.control = control

    def _core_config(self) -> CoreConfig:
        """What the core decides by itself, from the configuration (mimbox.core)."""
        lc, bc, sc = self.cfg.listener, self.cfg.buffers, self.cfg.safety
        source = {"static": DST_STATIC, "transparent": DST_TRANSPARENT, "explicit": DST_EXPLICIT}.get(lc.mode, DST_PYTHON)
        held = self.held.slots if self.held is not None else None
        return CoreConfig(
            engine=ENGINES[bc.engine], pipe_size=bc.pipe_size, splice_after=SPLICE_AFTER, dst_source=source,
            static_addr=ip_n(lc.upstream[0]) if lc.mode == "static" else 0,
            static_port=port_n(lc.upstream[1]) if lc.mode == "static" else 0,
            recorder_fd=self.recorder.map.fd if self.recorder is not None else -1,
            server_mptcp=int(lc.server_mptcp), server_rcvbuf=bc.server_rcvbuf or 0,
            server_sndbuf=bc.server_sndbuf or 0, fd_capacity=self.fd_capacity, worker=self.worker,
            workers=self.workers, syns_queued=int(self.queue_syns),
            server_mptcp_retry=sc.server_mptcp_retry, connect_timeout=sc.connect_timeout,
            idle_timeout=sc.idle_timeout, prefix_wait=PREFIX_WAIT,
            admission=self.admission.address(), admission_limit=self.admission.limit,
            held_slots=ctypes.addressof(held) if held is not None else None,
            held_mask=self.held.mask if self.held is not None else 0,
            syn_path=SYN_PATHS[lc.syn_path], pending_limit=lc.pending_limit,
            pending_per_prefix=lc.pending_per_prefix, explicit_opt=int(lc.mode == "explicit"),
            handshake_timeout=sc.handshake_timeout, spare_sockets=lc.spare_sockets, busy_poll_us=lc.busy_poll_us,
            access_log_every=self.cfg.access_log_every)

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
            self.core = Core(self._core_config())
            self.core.policy(self.policy)
            ports = lc.intercept_ports if lc.mode == "transparent" else (lc.port,)
            for port in ports:
                ls = mptcp.stream_socket(lc.client_mptcp)
                self.listeners.append(ls)
                ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # inherited by accepted sockets
                if self.workers > 1:
                    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # one listener per worker
                if lc.mode == "transparent":
                    ls.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
                if lc.mode == "convert":
                    converting.prepare_listener(ls, lc.backlog)
                for opt, val in ((socket.SO_RCVBUF, bc.client_rcvbuf), (socket.SO_SNDBUF, bc.client_sndbuf)):
                    if val:
                        ls.setsockopt(socket.SOL_SOCKET, opt, val)  # inherited by accepted sockets
                ls.bind((lc.addr, port))
                ls.listen(lc.backlog)
                self.core.listen(ls.fileno())
            if self.queue_syns:
                self.core.queue(lc.queue_num + self.worker)
            for other, link in self.links.items():
                self.core.link(other, link.fileno())
            if lc.health_port:
                hs = self.health_sock = socket.socket(socket.AF_INET, mptcp.NONBLOCKING_STREAM)
                hs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                hs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # every worker answers
                hs.bind((lc.addr, lc.health_port))      # where clients reach it, not every address
                hs.listen(64)
                self.core.watch(hs.fileno(), select.EPOLLIN)
            if self.cfg.stats_path:
                self.stats_sock = open_endpoint(self.cfg.stats_path)
                self.core.watch(self.stats_sock.fileno(), select.EPOLLIN)
            self.address_watch = AddressWatch()
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
        log.info("listening on %s:%d, mode %s, SYN path %s, engine %s, %s -> %s, limit %d connections",
                 lc.addr, lc.port, lc.mode, lc.syn_path, bc.engine, "MPTCP" if lc.client_mptcp else "TCP",
                 "MPTCP" if lc.server_mptcp else "TCP", min(self.admission.limit, self.fd_capacity * self.workers))
        log.info("policy: %s", self.policy.describe())
        return self

    def reconfigure(self, new: Config) -> None:
        """A reload (SIGHUP): what mimbox.configfile.RELOADABLE names changes for new connections and
        SYNs; established connections carry on. The caller has checked that nothing else changed."""
        new = dataclasses.replace(new.validate(), stats_path=self.cfg.stats_path)   # this worker's own
        policy = Policy.from_config(new.safety)        # (this host's addresses read anew)
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
        except OSError:
            pass

    def keep(self) -> None:
        """Start the keeper (a crash resets this worker's connections: mimbox.core.Core.keep)."""
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
        for g in list(self.greetings.values()):
            self._drop_greeting(g)
        self.refusals.flush()
        self.access.flush()
        self._close_health()
        self.answers.close()
        if self.address_watch is not None:
            self.address_watch.close()
            self.address_watch = None
        for s in (*self.listeners, self.stats_sock, *self.links.values(), self.control):
            if s is not None:
                s.close()
        if self.stats_sock is not None and self.cfg.stats_path:
            try:
                os.unlink(self.cfg.stats_path)
            except OSError:
                pass
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
                            self._on_greeting(self.greetings[fd])
                        elif fd == sfd:
                            self._serve_stats()
                        elif fd == hfd:
                            self._answer_health()
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
            self._greet(cs, addr, time.monotonic())
            return
        dst = addr_of(ev.daddr, ev.dport)
        if kind == EV_CLOSED:              # --access-log
            self.access.ended(addr, dst, ev.bytes_up, ev.bytes_down, ev.duration, ev.err)
            return
        if kind == EV_REFUSED:             # counted by the core; the log line is written here
            cause = CAUSES[ev.cause]
            self.refusals.refused(cause, "%s:%d -> %s (%s)" % (*addr, "%s:%d" % dst if ev.daddr else "?",
                                                              self._refusal_detail(ev, cause, dst)))
        elif kind == EV_GIVEBACK:          # convert mode: the client learns why from an Error TLV
            cs = socket.socket(fileno=ev.fd)
            cs.setblocking(False)
            self._answer(converting.Greeting(cs, addr, time.monotonic(), counted=False),
                         converting.error_for(CAUSES[ev.cause]))
        elif kind == EV_ABORTED:
            why = "idle timeout" if ev.err == ETIME else errno.errorcode.get(ev.err, str(ev.err))
            log.info("reset %s:%d -> %s:%d: %s", *addr, *dst, why)

    def _refusal_detail(self, ev, cause: Cause, dst) -> str:
        """The log line's reason for a refusal the core made (it sends codes, not sentences)."""
        after = "after accept: " if ev.after_accept else ""
        if cause is Cause.BAD_OPTION:
            text = syn_error(ev.detail, ev.arg)
        elif cause in (Cause.CLIENT_NOT_ALLOWED, Cause.DESTINATION_DENIED):
            text = self.policy.wording(cause, ev.detail, addr_of(ev.caddr, 0)[0], dst[0], dst[1])
        elif cause in (Cause.FD_LIMIT, Cause.CONNECTION_LIMIT):
            text = f"{ev.arg} connections" + (" per worker" if cause is Cause.FD_LIMIT else "")
        elif cause is Cause.PENDING_LIMIT:
            text = f"{ev.arg} SYNs held"
        elif ev.err:
            text = f"server {dst[0]}:{dst[1]}: {os.strerror(ev.err)}"
        else:
            text = cause.value
        return after + text

    def _contain(self, ev) -> None:
        """An unexpected error while serving an event: log it, count it, end what it belonged to."""
        log.exception("internal error on event %d fd %d", ev.kind, ev.fd)
        self.stats.errors["internal error"] += 1
        if ev.fd in self.greetings:
            self._drop_greeting(self.greetings[ev.fd])

    # -- convert mode's clients: what the core hands here -------------------------------------------------
    def _open_for_accepted(self, cs: socket.socket, addr, dst, now: float, reply: bytes, early: bytes) -> None:
        """Convert mode, message read: the core checks the destination, connects and relays (its
        convert_connect); the client was admitted when it was accepted (the core's greet()). A
        refusal comes back with its cause (counted by the core) for the log line and the Error TLV."""
        refused = self.core.convert_connect(cs.fileno(), addr, dst, now, reply, early)
        if refused is None:
            cs.detach()                  # the core's now
            return
        cause, detail, err = refused
        if cause in (Cause.CLIENT_NOT_ALLOWED, Cause.DESTINATION_DENIED):
            text = self.policy.wording(cause, detail, addr[0], dst[0], dst[1])
        else:
            text = f"server {dst[0]}:{dst[1]}: {os.strerror(err)}" if err else cause.value
        self._refuse_accepted(cs, addr, dst, cause, text, counted=True)

    # -- convert mode (RFC 8803): the destination is the first bytes of the stream ----------------------
    def _greet(self, cs: socket.socket, addr, now: float) -> None:
        g = converting.Greeting(cs, addr, now)
        self.greetings[cs.fileno()] = g
        self.core.watch(cs.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self._on_greeting(g)          # with TFO the message came in the SYN: it is there already

    def _on_greeting(self, g: converting.Greeting) -> None:
        if g.reply is not None:          # an answer waiting for the client's handshake
            if not converting.handshake_pending(g.sock):
                converting.answer_and_end(g.sock, g.reply)
                self._drop_greeting(g)
            return
        try:
            data = g.sock.recv(convert.MAX_MESSAGE - len(g.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_greeting(g)       # gone before its message was complete
            return
        try:
            msg = g.feed(data)
            if msg is None:
                return
            converting.check_cookie(msg, self.cfg.listener.convert_cookie)    # constant time
            converting.check_options(msg)
        except convert.ConvertError as e:
            self._answer_greeting(g, convert.error_reply(e.code))
            self.stats.refused[Cause.BAD_OPTION.value] += 1
            self.refusals.refused(Cause.BAD_OPTION, "%s:%d: Convert message: %s" % (*g.addr, e))
            return
        if msg.connect is None:          # an Info request: what this converter supports, then close
            self._answer_greeting(g, convert.supported_reply(convert.SUPPORTED_KINDS))
            return
        del self.greetings[g.sock.fileno()]
        self.core.unwatch(g.sock.fileno())
        self.core.greeting_end(g.addr[0], keep_admission=True)
        if ":" in msg.connect[0]:        # the server side of this converter is IPv4
            self.admission.give()
            return self._refuse_accepted(g.sock, g.addr, msg.connect, Cause.SERVER_UNREACHABLE,
                                         "IPv6 destinations are not served")
        self._open_for_accepted(g.sock, g.addr, msg.connect, g.t, convert.success_reply(), g.early_data)

    def _answer_greeting(self, g: converting.Greeting, reply: bytes) -> None:
        """Answer a client that gets no connection (Error, or Supported TCP Extensions), then close."""
        self._answer(g, reply)

    def _answer(self, g: converting.Greeting, reply: bytes) -> None:
        """Send `reply` and end the stream, once the client's handshake is complete (an answer written
        to an MPTCP socket before then is never sent: converting.handshake_pending)."""
        if converting.handshake_pending(g.sock):
            if not g.counted and self.waiting_answers() >= self.cfg.listener.pending_limit:
                self._reset(g.sock)      # not counted as a greeting: capped here, or an fd each
                return
            g.reply = reply
            self.greetings[g.sock.fileno()] = g
            self.core.watch(g.sock.fileno(), select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
            return
        converting.answer_and_end(g.sock, reply)
        self._drop_greeting(g)

    def waiting_answers(self) -> int:
        """Refused clients (no longer counted as greetings) whose answer waits for their handshake."""
        return sum(1 for g in self.greetings.values() if not g.counted)

    def _drop_greeting(self, g: converting.Greeting) -> None:
        if self.greetings.pop(g.sock.fileno(), None) is not None:
            self.core.unwatch(g.sock.fileno())
            if g.counted:
                self.core.greeting_end(g.addr[0], keep_admission=False)
                g.counted = False
        g.sock.close()

    def _refuse_accepted(self, cs: socket.socket, addr, dst, cause: Cause, detail: str, counted: bool = False) -> None:
        """Log, count (unless the core did), and tell the client: an Error TLV in convert mode, else RST."""
        if not counted:
            self.stats.refused[cause.value] += 1
        self.refusals.refused(cause, f"{addr[0]}:{addr[1]} -> {'%s:%d' % dst if dst else '?'} (after accept"
                                     + (f": {detail})" if detail else ")"))
        if self.cfg.listener.mode == "convert":     # RFC 8803: an Error TLV says why, then the stream ends
            converting.answer_and_end(cs, converting.error_for(cause))
            cs.close()
            return
        self._reset(cs)

    def _refresh_own(self) -> None:
        """This host's addresses, read again: never a destination (the policy and the core)."""
        if self.policy.set_own(local_addresses()):
            self.core.own_addresses(self.policy.own)
            log.info("this host's addresses: %s (never a destination)", ", ".join(sorted(map(str, self.policy.own))))

    def _answer_health(self) -> None:
        """A health probe: the handshake completed, which is the answer; close at once."""
        try:
            while True:
                self.health_sock.accept()[0].close()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            log.debug("health probe: %s", e)

    def _close_health(self) -> None:
        if self.health_sock is not None:
            if self.core is not None:
                self.core.unwatch(self.health_sock.fileno())
            self.health_sock.close()
            self.health_sock = None

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        except OSError:
            pass
        s.close()

    # -- timers and stats --------------------------------------------------------------------------------
    def _sweep(self, now: float) -> None:
        """Once a second: act on what waited too long (mimbox.timers decides it for convert messages;
        the core for held SYNs and connections)."""
        for g in due(self.timeouts, now, self.greetings.values()).greetings:
            if g.reply is not None:      # its handshake never completed: nobody to answer
                self.stats.errors["client handshake timeout"] += 1
                self._drop_greeting(g)
                continue
            self.stats.errors["convert message timeout"] += 1
            self._answer_greeting(g, convert.error_reply(convert.Error.MALFORMED_MESSAGE))
        for g in [g for g in self.greetings.values() if g.reply is not None]:
            self._on_greeting(g)         # (its EPOLLOUT edge should have come already)
        for ev in self.core.sweep():
            self._on_core_event(ev)
        self.answers.expire(now)
        if self.refusals.suppressed and now - self.refusals.window_start >= self.refusals.interval:
            self.refusals.flush()
        if self.access.suppressed and now - self.access.window_start >= self.access.interval:
            self.access.flush()

    def snapshot(self, connections: bool = True) -> dict:
        """The relay's counters and the core's, as one (`mimbox stats`)."""
        cs = self.core.stats()
        extra = {"active": cs.active, "pending": self.core.pending(), "limit": self.admission.limit,
                 "syn_path": self.cfg.listener.syn_path, "log_lines_refused": self.refusals.lines,
                 "admitted": self.admission.used, "fd_capacity": self.fd_capacity,
                 "mode": self.cfg.listener.mode, "engine": self.cfg.buffers.engine,
                 "pipes_pooled": cs.pipes_pooled, "spares": cs.spares, "workers": self.workers,
                 "greetings": self.core.greetings(), "accept_pauses": cs.accept_pauses,
                 "log_lines_access": self.access.lines, "access_log_dropped": cs.access_log_dropped,
                 "connect_hist": list(cs.connect_hist), "duration_hist": list(cs.duration_hist),
                 "duration_sum": cs.duration_sum}
        if connections:
            now = time.monotonic()
            extra["connections"] = [
                {"client": "%s:%d" % c.client, "server": "%s:%d" % c.server, "bytes_up": c.bytes_up,
                 "bytes_down": c.bytes_down, "client_mptcp": c.client_mptcp,
                 "client_subflows": mptcp.subflows(c.cfd), "server_mptcp": c.server_mptcp,
                 "server_subflows": mptcp.subflows(c.sfd), "age_s": round(now - c.t_accept, 3)}
                for c in self.core.connections()]
        d = self.stats.snapshot(**extra)
        for k in ("syns", "deferred", "accepted", "client_mptcp", "client_tcp", "server_mptcp", "server_tcp", "closed",
                  "bytes_up", "bytes_down", "server_connects", "server_tcp_remembered", "server_connect_us_sum",
                  "spare_used", "spare_made", "busy_polls"):
            d[k] += getattr(cs, k)
        d["server_connect_us_max"] = max(d["server_connect_us_max"], cs.server_connect_us_max)
        n = d["server_connects"]
        d["server_connect_us_mean"] = d["server_connect_us_sum"] / n if n else 0
        errors = d["errors"]
        for i, count in enumerate(cs.refused):
            if count:
                d["refused"][CAUSES[i].value] = d["refused"].get(CAUSES[i].value, 0) + count
        if self.recorder is not None and self.worker == 0 and self.recorder.conflicts():   # one map for all workers
            key = Cause.CONFLICTING_DESTINATION.value
            d["refused"][key] = d["refused"].get(key, 0) + self.recorder.conflicts()
        for prefix, counts in (("", cs.errors), ("accept ", cs.accept_errors), ("server ", cs.server_errors)):
            for e, count in enumerate(counts):
                if count:
                    key = prefix + errno.errorcode.get(e, str(e))
                    errors[key] = errors.get(key, 0) + count
        d["handed_over"] += cs.handed_over
        for e, count in enumerate(cs.handover_errors):
            if count:
                key = "hand-over " + errno.errorcode.get(e, str(e))
                errors[key] = errors.get(key, 0) + count
        for key, count in (("idle timeout", cs.idle_timeouts), (Cause.SERVER_TIMEOUT.value, cs.connect_timeouts),
                           ("server connect timeout", cs.held_connect_timeouts),
                           ("client handshake timeout", cs.handshake_timeouts),
                           ("accept while SYN held", cs.accept_while_held)):
            if count:
                errors[key] = errors.get(key, 0) + count
        return d

    def _serve_stats(self) -> None:
        """Answer `mimbox stats` without blocking the loop (mimbox.stats.Answers)."""
        fd = self.answers.accept(self.stats_sock, self.snapshot, time.monotonic())
        if fd is not None:
            self.core.watch(fd, select.EPOLLOUT | select.EPOLLET)
