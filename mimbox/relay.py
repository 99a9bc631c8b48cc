"""The converter's event loop: take a client's connection, connect to its server, relay both ways.

A held SYN, as in the paper (§3, Table 1), while the SYN path lets it (mimbox.synpath.SynGate):
  1. the client's SYN reaches NFQUEUE (rules in mimbox.netfilter) and is held here;
  2. its destination comes from the redirector (DST_OPT, TPROXY'd address, or static);
     the policy may refuse it -> the SYN is released marked, and the kernel answers RST;
  3. the converter connects to the server at once (MPTCP socket, plain TCP on fallback);
     refused/unreachable -> the client gets RST, never an accepted connection that then closes;
  4. established -> the SYN is released to the listener, the kernel completes the client handshake;
  5. accept() pairs the client socket with its server socket.
A SYN not held (past --hold-rate or the pending caps, or --syn-path accept) is answered by the
kernel; at accept() the destination comes from the BPF recorder (explicit: mimbox.synrecord),
TPROXY or the configuration, the policy is checked and the server connected; a failure resets the
client before any byte is relayed.

Then bytes move both ways through mimbox.datapath (copy, then splice for bulk); each direction's
EOF becomes a shutdown(SHUT_WR) on the other side; a reset on one side becomes a reset on the
other; both done -> both closed.
"""
from __future__ import annotations

import enum
import errno
import logging
import os
import select
import signal
import socket
import struct
import time
from dataclasses import dataclass

from netfilterqueue import COPY_PACKET, NetfilterQueue

from mimbox import convert, handover, mptcp
from mimbox.config import Config
from mimbox.datapath import PIPE_POOL, DataPath, Direction, flush_prefix
from mimbox.dstopt import OptionError, parse_syn
from mimbox.netfilter import REFUSE_MARK, ListenerRules
from mimbox.redirect import convert as converting
from mimbox.redirect import for_listener
from mimbox.safety import Policy
from mimbox.stats import Stats, answer, open_endpoint
from mimbox.synpath import (
    DEFER,
    REFUSE,
    Admission,
    Cause,
    Destinations,
    HeldSet,
    Pending,
    PendingState,
    RefusalLog,
    ServerMemory,
    SynGate,
)
from mimbox.synrecord import SynRecorder
from mimbox.timers import Timeouts, due

log = logging.getLogger("mimbox")

IP_TRANSPARENT = 19
EPOLLET = select.EPOLLET
EPOLLOUT = select.EPOLLOUT
NOT_OUT = ~select.EPOLLOUT
WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | EPOLLET
LINGER_RST = struct.pack("ii", 1, 0)
# events after which a direction reads until its source is empty; after a bare EPOLLIN one read
# that did not fill the buffer is enough (new bytes raise a new edge), which saves a failing read
DRAIN = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP


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
    if lc.mode == "explicit":
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


def raise_fd_limit(connections: int) -> int:
    """Raise RLIMIT_NOFILE for `connections` (two sockets each, pipes pooled); return how many fit."""
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
    except (ValueError, OSError):
        target = soft
    return max(1, (target - 2 * PIPE_POOL - 256) // 2)


class Connection:
    """A converted connection: the client's socket, the server's, and the two directions."""
    __slots__ = ("client", "server", "up", "down", "client_addr", "dst", "t_syn", "t_accept",
                 "last", "client_mptcp", "server_mptcp", "closed", "connecting", "tried_mptcp", "reply",
                 "early")

    def __init__(self, client: socket.socket, server: socket.socket, client_addr, dst, t_syn: float):
        self.client, self.server = client, server
        cfd, sfd = client.fileno(), server.fileno()
        self.up = Direction(cfd, sfd)
        self.down = Direction(sfd, cfd)
        self.client_addr, self.dst = client_addr, dst
        self.t_syn = t_syn
        self.t_accept = self.last = time.monotonic()
        self.client_mptcp = self.server_mptcp = False
        self.closed = False
        self.connecting = False       # accepted first: the server connection is still being made
        self.tried_mptcp = False
        self.reply = None             # convert mode: the Convert answer the client gets first ...
        self.early = b""              # ... and its bytes that followed its message, for the server

    def info(self) -> dict:
        return {"client": "%s:%d" % self.client_addr, "server": "%s:%d" % self.dst,
                "bytes_up": self.up.bytes, "bytes_down": self.down.bytes,
                "client_mptcp": self.client_mptcp, "client_subflows": mptcp.subflows(self.client),
                "server_mptcp": self.server_mptcp, "server_subflows": mptcp.subflows(self.server),
                "age_s": round(time.monotonic() - self.t_accept, 3)}


class Relay:
    """One listener and its event loop. `serve()` runs until SIGTERM/SIGINT, then drains.

    Alone (workers=1) it owns its netfilter rules. As one of several workers (mimbox.workers) it
    holds the SYNs of its share of source ports (queue_num + worker), listens with SO_REUSEPORT, and
    passes a connection the kernel gave it but whose SYN another worker held to that worker over
    `links` (SCM_RIGHTS); the supervisor owns the rules.
    """

    def __init__(self, cfg: Config, worker: int = 0, workers: int = 1,
                 links: dict[int, socket.socket] | None = None, admission: Admission | None = None,
                 plan: SynPlan | None = None, held: HeldSet | None = None):
        """plan: the supervisor's (it owns rules and recorder); None: this relay plans and owns them.
        held: the workers' shared set of held SYNs (None: hand over every connection another worker
        owns by its source port)."""
        self.cfg = cfg.validate()
        lc, bc = cfg.listener, cfg.buffers
        self.worker, self.workers = worker, workers
        self.links = links or {}          # other worker -> a unix datagram socket connected to it
        self.redirect = for_listener(lc)
        self.servers = ServerMemory(cfg.safety.server_mptcp_retry)
        self.policy = Policy.from_config(cfg.safety)
        self.admission = admission or Admission(cfg.connection_limit())
        # what this process's RLIMIT_NOFILE lets it hold (all connections may pick one worker)
        self.fd_capacity = raise_fd_limit(self.admission.limit)
        self.stats = Stats()
        self.gate = SynGate(lc.syn_path, lc.pending_limit, lc.pending_per_prefix)
        self.destinations = Destinations(ttl=2 * cfg.safety.handshake_timeout)
        self.timeouts = Timeouts.of(cfg.safety)
        self.refusals = RefusalLog(log)
        self.plan = plan              # made in open() when this relay owns it
        self.owns_plan = plan is None
        self.queue_syns = True
        self.recorder: SynRecorder | None = None
        self.held = held
        self.pending: dict[tuple[str, int], Pending] = {}
        self.pending_fds: dict[int, tuple[tuple[str, int], Pending]] = {}
        self.greetings: dict[int, converting.Greeting] = {}     # convert mode: messages on their way
        self.conns: dict[int, tuple[Connection, bool]] = {}   # fd -> (connection, is_client_side)
        self.stopping = False
        self.epoll = select.epoll()
        self.rules = None
        self.listeners: list[socket.socket] = []
        self.nfq = None
        self.stats_sock = None
        self.health_sock: socket.socket | None = None
        self.data = DataPath(bc.engine, bc.pipe_size, finish=self._finish, abort=self._abort)
        self.pump = self.data.pump
        self.debug = log.isEnabledFor(logging.DEBUG)

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
                self.epoll.register(ls.fileno(), select.EPOLLIN)
            if self.queue_syns:
                self.nfq = NetfilterQueue()
                self.nfq.bind(lc.queue_num + self.worker, self._on_syn, max_len=65536, mode=COPY_PACKET, range=120)
                self.epoll.register(self.nfq.get_fd(), select.EPOLLIN)
            for link in self.links.values():
                link.setblocking(False)
                self.epoll.register(link.fileno(), select.EPOLLIN)
            if lc.health_port:
                hs = self.health_sock = socket.socket(socket.AF_INET, mptcp.NONBLOCKING_STREAM)
                hs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                hs.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)   # every worker answers
                hs.bind(("0.0.0.0", lc.health_port))
                hs.listen(64)
                self.epoll.register(hs.fileno(), select.EPOLLIN)
            if self.cfg.stats_path:
                self.stats_sock = open_endpoint(self.cfg.stats_path)
                self.epoll.register(self.stats_sock.fileno(), select.EPOLLIN)
            if self.rules is not None:
                self.rules.install()
        except BaseException:
            self.close()
            raise
        log.info("listening on %s:%d, mode %s, SYN path %s, engine %s, %s -> %s, limit %d connections",
                 lc.addr, lc.port, lc.mode, lc.syn_path, bc.engine, "MPTCP" if lc.client_mptcp else "TCP",
                 "MPTCP" if lc.server_mptcp else "TCP", min(self.admission.limit, self.fd_capacity * self.workers))
        log.info("policy: %s", self.policy.describe())
        return self

    def close(self) -> None:
        """Remove the rules, reset what is still open, release every fd (idempotent)."""
        if self.rules is not None:
            self.rules.remove()
        if self.owns_plan and self.plan is not None:
            self.plan.close()
        for key, p in list(self.pending.items()):
            self._refuse_pending(key, p, Cause.SHUTTING_DOWN, "")
        for conn, _ in list(self.conns.values()):
            self._abort(conn, Cause.SHUTTING_DOWN.value)
        for g in list(self.greetings.values()):
            self._drop_greeting(g)
        self.refusals.flush()
        if self.nfq is not None:
            self.nfq.unbind()
            self.nfq = None
        self._close_health()
        for s in (*self.listeners, self.stats_sock, *self.links.values()):
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
        self.data.close()
        self.epoll.close()

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
        try:
            self._loop(lambda: self.stopping)
            self._close_health()         # a balancer stops sending new clients here
            log.info("stopping: no new connections, draining %d", len(self.conns) // 2)
            if self.rules is not None:
                self.rules.remove()      # new SYNs now meet a closed port (RST)
            for ls in self.listeners:
                self.epoll.unregister(ls.fileno())
                ls.close()
            self.listeners = []
            deadline = time.monotonic() + drain_timeout
            self._loop(lambda: not self.conns or time.monotonic() > deadline)
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _loop(self, done) -> None:
        poll = self.epoll.poll
        conns = self.conns
        lfds = {ls.fileno(): ls for ls in self.listeners}
        qfd = self.nfq.get_fd() if self.nfq is not None else -3
        sfd = self.stats_sock.fileno() if self.stats_sock else -2
        link_fds = {s.fileno(): s for s in self.links.values()}
        hfd = self.health_sock.fileno() if self.health_sock else -4
        next_sweep = time.monotonic() + 1.0
        while not done():
            try:
                events = poll(1.0)
            except InterruptedError:
                continue
            pump = self.pump
            for fd, ev in events:
                try:
                    entry = conns.get(fd)
                    if entry is not None:
                        conn, is_client = entry
                        if conn.connecting:
                            if not is_client:
                                self._server_ready(conn, ev)
                            continue      # client bytes wait in its socket until the server is there
                        d_in, d_out = (conn.up, conn.down) if is_client else (conn.down, conn.up)
                        if ev & NOT_OUT:
                            pump(conn, d_in, ev & DRAIN)
                        if ev & EPOLLOUT and d_out.buffered and not conn.closed:
                            pump(conn, d_out, True)      # its destination has room again
                    elif fd == qfd:
                        self.nfq.run(block=False)
                    elif fd in lfds:
                        self._accept(lfds[fd])
                    elif fd in self.pending_fds:
                        self._server_connected(fd, ev)
                    elif fd in link_fds:
                        self._receive_handed(link_fds[fd])
                    elif fd in self.greetings:
                        self._on_greeting(self.greetings[fd])
                    elif fd == sfd:
                        self._serve_stats()
                    elif fd == hfd:
                        self._answer_health()
                except Exception:      # one connection's bug must not stop every other one
                    self._contain(fd)
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 1.0

    def _contain(self, fd: int) -> None:
        """An unexpected error while serving `fd`: log it, count it, and end what it belonged to."""
        log.exception("internal error on fd %d", fd)
        self.stats.errors["internal error"] += 1
        entry = self.conns.get(fd)
        if entry is not None:
            self._abort(entry[0], "internal error")
        elif fd in self.greetings:
            self._drop_greeting(self.greetings[fd])

    # -- SYN hold ----------------------------------------------------------------------------------------
    def _on_syn(self, pkt) -> None:
        now = time.monotonic()
        try:
            syn = parse_syn(pkt.get_payload())
        except OptionError:
            pkt.accept()          # not an IPv4 TCP SYN: not ours to judge
            return
        if syn.options.mp_join:
            pkt.accept()          # a new subflow of an existing MPTCP connection: the kernel's business
            return
        self.stats.syns += 1
        key = (syn.src, syn.sport)
        p = self.pending.get(key)
        if p is not None:
            # A retransmitted SYN: drop it while the first is held; once released, let the kernel answer.
            pkt.drop() if p.state is PendingState.HELD else pkt.accept()
            return
        try:
            dst = self.redirect.destination(syn)
        except OptionError as e:
            return self._refuse(pkt, key, None, Cause.BAD_OPTION, str(e))
        refusal = self.policy.refusal(syn.src, dst[0], dst[1])
        if refusal is not None:
            return self._refuse(pkt, key, dst, *refusal)
        client_ip = int.from_bytes(socket.inet_aton(syn.src), "big")
        decision = self.gate.decide(client_ip)
        if decision == DEFER:
            # The kernel answers this SYN (SYN cookies if its backlog is full); the server is
            # connected only if the client completes its handshake (_connect_after_accept).
            self.stats.deferred += 1
            if self.cfg.listener.mode == "explicit":
                self.destinations.remember(key, dst, now)
            pkt.accept()
            return
        if decision == REFUSE:
            return self._refuse(pkt, key, dst, Cause.PENDING_LIMIT, f"{self.gate.held} SYNs held")
        opened = self._admit_and_open(dst, now, lambda cause, detail: self._refuse(pkt, key, dst, cause, detail))
        if opened is None:
            return
        s, try_mptcp = opened
        p = Pending(pkt, s, dst, now, try_mptcp, client_ip)
        self.pending[key] = p
        self.gate.hold(client_ip)
        if self.held is not None:
            self.held.add(key)
        self.pending_fds[s.fileno()] = (key, p)
        self.epoll.register(s.fileno(), WATCH)

    def _admit_and_open(self, dst: tuple[str, int], now: float, refuse) -> tuple[socket.socket, bool] | None:
        """Admit one more connection and start its server connection; or call refuse(cause, detail)
        (an RST to a held SYN, or to an accepted client) and return None."""
        full = self._capacity_refusal()
        if full is not None:
            refuse(*full)
            return None
        try:
            return self._open_server(dst, now)
        except OSError as e:
            self.admission.give()
            refuse(Cause.of_errno(e.errno), f"server {dst[0]}:{dst[1]}: {e.strerror}")
            return None

    def _capacity_refusal(self) -> tuple[Cause, str] | None:
        """None after admitting one connection, or why there is no room for it."""
        if len(self.conns) // 2 + len(self.pending) >= self.fd_capacity:
            return Cause.FD_LIMIT, f"{self.fd_capacity} connections per worker"
        if not self.admission.take():
            return Cause.CONNECTION_LIMIT, f"{self.admission.limit} connections"
        return None

    def _open_server(self, dst: tuple[str, int], now: float) -> tuple[socket.socket, bool]:
        """A non-blocking socket connecting to `dst` (MPTCP unless the server was seen without it)."""
        bc = self.cfg.buffers
        try_mptcp = self.cfg.listener.server_mptcp and not self.servers.tcp_only(dst, now)
        if self.cfg.listener.server_mptcp and not try_mptcp:
            self.stats.server_tcp_remembered += 1
        s = mptcp.stream_socket(try_mptcp)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if bc.server_rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bc.server_rcvbuf)
            if bc.server_sndbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bc.server_sndbuf)
            err = s.connect_ex(dst)
        except OSError:
            s.close()
            raise
        if err not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(err, os.strerror(err))
        return s, try_mptcp

    def _server_connected(self, fd: int, ev: int) -> None:
        key, p = self.pending_fds[fd]
        if p.state is PendingState.RELEASED:
            return                # waiting for accept()
        err = 0
        if ev & (select.EPOLLERR | select.EPOLLHUP) or not ev & select.EPOLLOUT:
            err = p.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)   # writable alone: connected
        if err:
            self.stats.errors["server " + errno.errorcode.get(err, str(err))] += 1
            return self._refuse_pending(key, p, Cause.of_errno(err), f"server {p.dst[0]}:{p.dst[1]}: {os.strerror(err)}")
        now = time.monotonic()
        self.stats.server_connected(now - p.t_syn)
        if p.tried_mptcp:
            p.server_mptcp = mptcp.is_mptcp(p.server)
            self.servers.learn(p.dst, p.server_mptcp, now)
        p.ready_at = now
        p.release().accept()              # the kernel now answers the client's SYN

    def _refuse(self, pkt, key, dst, cause: Cause, detail: str) -> None:
        self.stats.refused[cause.value] += 1
        self.refusals.refused(cause, f"{key[0]}:{key[1]} -> {'%s:%d' % dst if dst else '?'}"
                                     + (f" ({detail})" if detail else ""))
        pkt.set_mark(REFUSE_MARK)
        pkt.accept()              # filter/INPUT answers a marked SYN with a TCP RST

    def _refuse_pending(self, key, p: Pending, cause: Cause, detail: str) -> None:
        if self.pending.pop(key, None) is not None:
            self.admission.give()
            self.gate.release(p.client_ip)
            if self.held is not None:
                self.held.discard(key)
        self.pending_fds.pop(p.server.fileno(), None)
        try:
            self.epoll.unregister(p.server.fileno())
        except (OSError, ValueError):
            pass
        p.server.close()
        if p.state is PendingState.HELD:
            self._refuse(p.release(), key, p.dst, cause, detail)

    # -- accept / pair -------------------------------------------------------------------------------
    def _accept(self, ls: socket.socket) -> None:
        """One connection per event: the listener is level-triggered, so epoll reports it again
        while more wait, and no accept() ends in a failing call (an exception in Python)."""
        try:
            cs, addr = ls.accept()
        except BlockingIOError:
            return
        except OSError as e:
            self.stats.errors["accept " + errno.errorcode.get(e.errno, str(e.errno))] += 1
            return
        owner = handover.owner_elsewhere(addr, self.worker, self.workers, self.queue_syns, self.held)
        if owner is not None:         # its SYN is held there, with its server connection
            err = handover.send(self.links[owner], cs)
            if err is None:
                self.stats.handed_over += 1
            else:
                self.stats.errors["hand-over " + err] += 1
                self._reset(cs)
            return
        cs.setblocking(False)
        self._pair(cs, addr)

    def _receive_handed(self, link: socket.socket) -> None:
        for cs, addr in handover.receive(link):
            if addr is None:
                self._reset(cs)       # the client went away on the way here
            else:
                self._pair(cs, addr)

    def _pair(self, cs: socket.socket, addr) -> None:
        """Pair an accepted client socket with the server socket started at its SYN; start relaying."""
        p = self.pending.get(addr)
        if p is None:
            return self._connect_after_accept(cs, addr)
        if p.state is PendingState.HELD:
            # Its SYN is still held (a retransmission the kernel answered before ours was): reset.
            self.stats.errors["accept while SYN held"] += 1
            self._reset(cs)
            return
        del self.pending[addr]
        self.gate.release(p.client_ip)
        if self.held is not None:
            self.held.discard(addr)
        sfd = p.server.fileno()
        del self.pending_fds[sfd]
        conn = Connection(cs, p.server, addr, p.dst, p.t_syn)
        conn.server_mptcp = p.server_mptcp
        self._start(conn)
        self._count_server(conn)
        # the server socket is registered since connect(); ET: pump once for data already there
        self.pump(conn, conn.down)
        if not conn.closed:
            self.pump(conn, conn.up)

    def _start(self, conn: Connection) -> None:
        """Count the accepted connection and watch both its sockets."""
        st = self.stats
        st.accepted += 1
        conn.client_mptcp = mptcp.is_mptcp(conn.client)
        if conn.client_mptcp:
            st.client_mptcp += 1
        else:
            st.client_tcp += 1
        cfd, sfd = conn.client.fileno(), conn.server.fileno()
        self.conns[cfd] = (conn, True)
        self.conns[sfd] = (conn, False)
        self.epoll.register(cfd, WATCH)

    def _connect_after_accept(self, cs: socket.socket, addr) -> None:
        """A client whose SYN was not held (accept or auto past the caps): find its destination,
        check it, connect; the client is reset if that fails (it has no byte relayed yet)."""
        now = time.monotonic()
        lc = self.cfg.listener
        if lc.mode == "convert":
            return self._greet(cs, addr, now)
        if lc.mode == "static":
            dst = lc.upstream
        elif lc.mode == "transparent":
            dst = cs.getsockname()     # TPROXY kept the address the client asked for
        else:
            dst = self.destinations.take(addr, now) or (self.recorder.pop(addr) if self.recorder else None)
            if dst is None:
                return self._refuse_accepted(cs, addr, None, Cause.NO_DESTINATION, "no DST_OPT seen in its SYN")
            if dst[1] == 0 or dst[0] == "0.0.0.0":
                return self._refuse_accepted(cs, addr, dst, Cause.BAD_OPTION, "DST_OPT port 0 or address 0.0.0.0")
        self._open_for_accepted(cs, addr, dst, now)

    def _open_for_accepted(self, cs: socket.socket, addr, dst, now: float) -> Connection | None:
        """Policy, admission and the server connection for an accepted client; None if refused."""
        refusal = self.policy.refusal(addr[0], dst[0], dst[1])   # its SYN may not have been judged
        if refusal is not None:
            return self._refuse_accepted(cs, addr, dst, *refusal)
        opened = self._admit_and_open(dst, now,
                                      lambda cause, detail: self._refuse_accepted(cs, addr, dst, cause, detail))
        if opened is None:
            return None
        s, try_mptcp = opened
        conn = Connection(cs, s, addr, dst, now)
        conn.connecting, conn.tried_mptcp = True, try_mptcp
        self._start(conn)
        self.epoll.register(s.fileno(), WATCH)
        return conn

    # -- convert mode (RFC 8803): the destination is the first bytes of the stream ----------------------
    def _greet(self, cs: socket.socket, addr, now: float) -> None:
        g = converting.Greeting(cs, addr, now)
        self.greetings[cs.fileno()] = g
        self.epoll.register(cs.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self._on_greeting(g)          # with TFO the message came in the SYN: it is there already

    def _on_greeting(self, g: converting.Greeting) -> None:
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
            converting.check_cookie(msg, self.cfg.listener.convert_cookie)
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
        self.epoll.unregister(g.sock.fileno())
        if ":" in msg.connect[0]:        # the server side of this converter is IPv4
            return self._refuse_accepted(g.sock, g.addr, msg.connect, Cause.SERVER_UNREACHABLE,
                                         "IPv6 destinations are not served")
        conn = self._open_for_accepted(g.sock, g.addr, msg.connect, g.t)
        if conn is not None:
            conn.reply, conn.early = convert.success_reply(), g.early_data

    def _answer_greeting(self, g: converting.Greeting, reply: bytes) -> None:
        """Answer a client that gets no connection (Error, or Supported TCP Extensions), then close."""
        converting.answer_and_end(g.sock, reply)
        self._drop_greeting(g)

    def _drop_greeting(self, g: converting.Greeting) -> None:
        if self.greetings.pop(g.sock.fileno(), None) is not None:
            try:
                self.epoll.unregister(g.sock.fileno())
            except OSError:
                pass
        g.sock.close()

    def _server_ready(self, conn: Connection, ev: int) -> None:
        """The server connection of an accepted-first client is established (or failed)."""
        err = 0
        if ev & (select.EPOLLERR | select.EPOLLHUP) or not ev & select.EPOLLOUT:
            err = conn.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if not err and not ev & select.EPOLLOUT:
                return            # not yet
        if err:
            cause = Cause.of_errno(err)
            self.stats.refused[cause.value] += 1
            self.refusals.refused(cause, "%s:%d -> %s:%d (after accept: %s)" % (*conn.client_addr, *conn.dst,
                                                                                 os.strerror(err)))
            self._fail_connecting(conn, cause)
            return
        now = time.monotonic()
        conn.connecting = False
        if conn.reply is not None and not self._start_converted(conn):
            return
        self.stats.server_connected(now - conn.t_syn)
        if conn.tried_mptcp:
            conn.server_mptcp = mptcp.is_mptcp(conn.server)
            self.servers.learn(conn.dst, conn.server_mptcp, now)
        self._count_server(conn)
        self.pump(conn, conn.up)          # what the client sent meanwhile (its edges were not acted on)
        if ev & select.EPOLLIN and not conn.closed:
            self.pump(conn, conn.down)    # later server bytes raise their own edge

    def _start_converted(self, conn: Connection) -> bool:
        """Convert mode, server connected: the client's early bytes to the server (they fit a fresh
        socket; a short write is a failure, not a truncation), and the client's answer queued in
        front of the server's first bytes: one segment, so that an event-driven client is not woken
        by the answer alone (wrk counts such a read as an error). A client that sent nothing yet
        and a silent server: the sweep sends it alone (mimbox.timers)."""
        ok = True
        try:
            if conn.early:
                ok = conn.server.send(conn.early) == len(conn.early)
                conn.up.bytes += len(conn.early)
        except OSError:
            ok = False
        conn.down.prefix = conn.reply
        conn.reply, conn.early = None, b""
        conn.last = time.monotonic()
        if not ok:
            self._abort(conn, "convert reply not sent")
        return ok

    def _fail_connecting(self, conn: Connection, cause: Cause) -> None:
        """The server connection of an accepted client failed: RST to the client, or in convert
        mode the Error TLV for `cause`, then the end of the stream."""
        if conn.reply is None:
            self._close(conn, reset=True)
            return
        converting.answer_and_end(conn.client, converting.error_for(cause))
        self._close(conn)

    def _count_server(self, conn: Connection) -> None:
        if conn.server_mptcp:
            self.stats.server_mptcp += 1
        else:
            self.stats.server_tcp += 1

    def _refuse_accepted(self, cs: socket.socket, addr, dst, cause: Cause, detail: str) -> None:
        self.stats.refused[cause.value] += 1
        self.refusals.refused(cause, f"{addr[0]}:{addr[1]} -> {'%s:%d' % dst if dst else '?'} (after accept"
                                     + (f": {detail})" if detail else ")"))
        if self.cfg.listener.mode == "convert":     # RFC 8803: an Error TLV says why, then the stream ends
            converting.answer_and_end(cs, converting.error_for(cause))
            cs.close()
            return
        self._reset(cs)

    def _finish(self, conn: Connection, d: Direction) -> None:
        """The source said EOF and everything before it was delivered: pass the FIN on."""
        if d.done:
            return
        d.done = True
        if d.prefix:
            flush_prefix(d)       # convert mode: the answer before the end of the stream
        if conn.up.done and conn.down.done:
            self._close(conn)     # close() sends this FIN: both sockets have read their EOF, so no RST
            return
        dst = conn.server if d is conn.up else conn.client
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

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
            try:
                self.epoll.unregister(self.health_sock.fileno())
            except (OSError, ValueError):
                pass
            self.health_sock.close()
            self.health_sock = None

    def _close(self, conn: Connection, reset: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.admission.give()
        st = self.stats
        st.closed += 1
        st.bytes_up += conn.up.bytes
        st.bytes_down += conn.down.bytes
        for s in (conn.client, conn.server):
            self.conns.pop(s.fileno(), None)   # close() below also drops it from the epoll set
            if reset:
                self._reset(s)
            else:
                s.close()
        self.data.release(conn.up)
        self.data.release(conn.down)
        if self.debug:
            log.debug("closed %s:%d -> %s:%d up=%d down=%d", *conn.client_addr, *conn.dst,
                      conn.up.bytes, conn.down.bytes)

    def _abort(self, conn: Connection, cause: str) -> None:
        """One side failed (reset, timeout...): reset both, so neither peer waits for nothing."""
        if conn.closed:
            return
        self.stats.errors[cause] += 1
        log.info("reset %s:%d -> %s:%d: %s", *conn.client_addr, *conn.dst, cause)
        self._close(conn, reset=True)

    @staticmethod
    def _reset(s: socket.socket) -> None:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        except OSError:
            pass
        s.close()

    # -- timers and stats --------------------------------------------------------------------------------
    def _sweep(self, now: float) -> None:
        """Once a second: act on what waited too long (mimbox.timers decides what that is)."""
        t = self.timeouts
        d = due(t, now, self.pending, self._connections(), self.greetings.values())
        for key, p in d.server_silent:
            self.stats.errors["server connect timeout"] += 1
            self._refuse_pending(key, p, Cause.SERVER_TIMEOUT, f"server {p.dst[0]}:{p.dst[1]}: no answer in {t.connect:g}s")
        for key, p in d.client_silent:
            self.stats.errors["client handshake timeout"] += 1
            self._refuse_pending(key, p, Cause.HANDSHAKE_TIMEOUT, "")
        for conn in d.connect_after_accept:
            self.stats.refused[Cause.SERVER_TIMEOUT.value] += 1
            self.stats.errors[Cause.SERVER_TIMEOUT.value] += 1
            self._fail_connecting(conn, Cause.SERVER_TIMEOUT)
        for g in d.greetings:
            self.stats.errors["convert message timeout"] += 1
            self._answer_greeting(g, convert.error_reply(convert.Error.MALFORMED_MESSAGE))
        for conn in d.lone_answers:
            flush_prefix(conn.down)       # the server is silent: the client gets its answer alone
        for conn in d.idle:
            self._abort(conn, "idle timeout")
        self.destinations.expire(now)
        if self.refusals.suppressed and now - self.refusals.window_start >= self.refusals.interval:
            self.refusals.flush()

    def _connections(self) -> list[Connection]:
        """Each open connection once (self.conns holds it under both of its sockets)."""
        return [c for c, is_client in self.conns.values() if is_client]

    def snapshot(self, connections: bool = True) -> dict:
        conns = self._connections()
        extra = {"active": len(conns), "pending": len(self.pending), "limit": self.admission.limit,
                 "syn_path": self.cfg.listener.syn_path, "log_lines_refused": self.refusals.lines,
                 "admitted": self.admission.used, "fd_capacity": self.fd_capacity,
                 "mode": self.cfg.listener.mode, "engine": self.cfg.buffers.engine,
                 "pipes_pooled": len(self.data.pool), "workers": self.workers}
        if connections:
            extra["connections"] = [c.info() for c in conns]
        return self.stats.snapshot(**extra)

    def _serve_stats(self) -> None:
        answer(self.stats_sock, self.snapshot)
