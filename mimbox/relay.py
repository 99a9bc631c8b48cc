"""The converter's event loop: hold the client's SYN, connect to the server, relay bytes both ways.

Order of a connection, as in the paper (§3, Table 1):
  1. the client's SYN reaches NFQUEUE (rules in mimbox.netfilter) and is held here;
  2. its destination comes from the redirector (DST_OPT, TPROXY'd address, or static);
     the policy may refuse it -> the SYN is released marked, and the kernel answers RST;
  3. the converter connects to the server at once (MPTCP socket, plain TCP on fallback);
     refused/unreachable -> the client gets RST, never an accepted connection that then closes;
  4. established -> the SYN is released to the listener, the kernel completes the client handshake;
  5. accept() pairs the client socket with its server socket; bytes move socket -> pipe -> socket
     with splice() (no copy to user space), or with recv/send for `--engine copy`;
  6. each direction's EOF becomes a shutdown(SHUT_WR) on the other side; a reset on one side
     becomes a reset on the other; both done -> both closed.

Back-pressure: a direction reads from its source only when its pipe is empty, so a slow reader
stops the converter from reading (the sender's window closes); memory per connection is bounded
by the socket buffers and one pipe per direction.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import time

from netfilterqueue import COPY_PACKET, NetfilterQueue

from mimbox import mptcp
from mimbox.config import Config
from mimbox.dstopt import OptionError, parse_syn
from mimbox.netfilter import REFUSE_MARK, ListenerRules, worker_of_port
from mimbox.redirect import for_listener
from mimbox.safety import Policy
from mimbox.stats import Stats, answer, open_endpoint

log = logging.getLogger("mimbox")

F_SETPIPE_SZ = 1031
SPLICE_F_MOVE, SPLICE_F_NONBLOCK = 1, 2
IP_TRANSPARENT = 19
EPOLLET = select.EPOLLET
WATCH = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | EPOLLET
LINGER_RST = struct.pack("ii", 1, 0)
PIPE_POOL = 1024


def listener_rules(cfg: Config, workers: int = 1) -> ListenerRules:
    """The netfilter rules a listener of `cfg` needs (installed by the relay, or by the supervisor)."""
    lc = cfg.listener
    return ListenerRules(port=lc.port, queue_num=lc.queue_num, listen_addr=lc.addr,
                         transparent_ports=lc.intercept_ports if lc.mode == "transparent" else (),
                         transparent_from=lc.intercept_from, workers=workers)


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


class Admission:
    """The connection limit. Workers share one counter (shared memory, under a lock), so the limit
    holds for the converter as a whole whichever worker a client's source port picks."""

    def __init__(self, limit: int, shared: bool = False):
        import multiprocessing
        self.limit = limit
        self.shared = multiprocessing.Value("q", 0) if shared else None
        self.count = 0

    def take(self) -> bool:
        """Admit one more connection, or say False at the limit."""
        if self.shared is None:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True
        with self.shared.get_lock():
            if self.shared.value >= self.limit:
                return False
            self.shared.value += 1
            return True

    def give(self) -> None:
        """A connection admitted by take() has ended."""
        if self.shared is None:
            self.count -= 1
            return
        with self.shared.get_lock():
            self.shared.value -= 1

    @property
    def used(self) -> int:
        return self.count if self.shared is None else self.shared.value


class ServerMemory:
    """Servers that answered an MPTCP SYN without MPTCP: the next connections to them, for `ttl`
    seconds, use plain TCP sockets. An MPTCP socket falls back by itself, but its extra layer costs
    on every system call of the connection (Fig. 5's 1 KB load: 18 % more requests/s with TCP
    sockets towards nginx). After `ttl` MPTCP is tried again; ttl 0 turns the memory off."""

    def __init__(self, ttl: float, size: int = 65536):
        self.ttl, self.size = ttl, size
        self.until: dict[tuple[str, int], float] = {}

    def tcp_only(self, dst: tuple[str, int], now: float) -> bool:
        t = self.until.get(dst)
        if t is None:
            return False
        if now < t:
            return True
        del self.until[dst]
        return False

    def learn(self, dst: tuple[str, int], mptcp_works: bool, now: float) -> None:
        if mptcp_works or self.ttl <= 0:
            self.until.pop(dst, None)
            return
        if len(self.until) >= self.size:
            self.until.pop(next(iter(self.until)))     # the oldest entry (dicts keep insertion order)
        self.until[dst] = now + self.ttl


class Direction:
    """One way of a connection: src socket -> pipe (or buffer) -> dst socket."""
    __slots__ = ("src", "dst", "pipe_r", "pipe_w", "buf", "off", "buffered", "eof", "done", "bytes")

    def __init__(self, src: int, dst: int):
        self.src, self.dst = src, dst
        self.pipe_r = self.pipe_w = -1
        self.buf = None
        self.off = 0
        self.buffered = 0
        self.eof = False
        self.done = False
        self.bytes = 0


class Connection:
    """A converted connection: the client's socket, the server's, and the two directions."""
    __slots__ = ("client", "server", "up", "down", "client_addr", "dst", "t_syn", "t_accept",
                 "last", "client_mptcp", "server_mptcp", "closed")

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

    def info(self) -> dict:
        return {"client": "%s:%d" % self.client_addr, "server": "%s:%d" % self.dst,
                "bytes_up": self.up.bytes, "bytes_down": self.down.bytes,
                "client_mptcp": self.client_mptcp, "client_subflows": mptcp.subflows(self.client),
                "server_mptcp": self.server_mptcp, "server_subflows": mptcp.subflows(self.server),
                "age_s": round(time.monotonic() - self.t_accept, 3)}


class Pending:
    """A held SYN and the server connection started for it."""
    __slots__ = ("pkt", "server", "dst", "t_syn", "ready_at", "tried_mptcp", "server_mptcp")

    def __init__(self, pkt, server: socket.socket, dst, t_syn: float, tried_mptcp: bool):
        self.pkt, self.server, self.dst, self.t_syn = pkt, server, dst, t_syn
        self.ready_at = 0.0
        self.tried_mptcp = tried_mptcp
        self.server_mptcp = False


class Relay:
    """One listener and its event loop. `serve()` runs until SIGTERM/SIGINT, then drains.

    Alone (workers=1) it owns its netfilter rules. As one of several workers (mimbox.workers) it
    holds the SYNs of its share of source ports (queue_num + worker), listens with SO_REUSEPORT, and
    passes a connection the kernel gave it but whose SYN another worker held to that worker over
    `links` (SCM_RIGHTS); the supervisor owns the rules.
    """

    def __init__(self, cfg: Config, worker: int = 0, workers: int = 1,
                 links: dict[int, socket.socket] | None = None, admission: Admission | None = None):
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
        self.pending: dict[tuple[str, int], Pending] = {}
        self.pending_fds: dict[int, tuple[tuple[str, int], Pending]] = {}
        self.conns: dict[int, tuple[Connection, bool]] = {}   # fd -> (connection, is_client_side)
        self.pipes: list[tuple[int, int]] = []
        self.stopping = False
        self.epoll = select.epoll()
        self.rules = None if workers > 1 else listener_rules(cfg)
        self.listeners: list[socket.socket] = []
        self.nfq = None
        self.stats_sock = None
        self.pump = self._pump_splice if bc.engine == "splice" else self._pump_copy
        self.debug = log.isEnabledFor(logging.DEBUG)

    # -- set-up / teardown ---------------------------------------------------------------------------
    def open(self) -> "Relay":
        """Listen, bind the SYN queue, install the rules; everything is undone by close()."""
        lc, bc = self.cfg.listener, self.cfg.buffers
        try:
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
                for opt, val in ((socket.SO_RCVBUF, bc.client_rcvbuf), (socket.SO_SNDBUF, bc.client_sndbuf)):
                    if val:
                        ls.setsockopt(socket.SOL_SOCKET, opt, val)  # inherited by accepted sockets
                ls.bind((lc.addr, port))
                ls.listen(lc.backlog)
                self.epoll.register(ls.fileno(), select.EPOLLIN)
            self.nfq = NetfilterQueue()
            self.nfq.bind(lc.queue_num + self.worker, self._on_syn, max_len=65536, mode=COPY_PACKET, range=120)
            self.epoll.register(self.nfq.get_fd(), select.EPOLLIN)
            for link in self.links.values():
                link.setblocking(False)
                self.epoll.register(link.fileno(), select.EPOLLIN)
            if self.cfg.stats_path:
                self.stats_sock = open_endpoint(self.cfg.stats_path)
                self.epoll.register(self.stats_sock.fileno(), select.EPOLLIN)
            if self.rules is not None:
                self.rules.install()
        except BaseException:
            self.close()
            raise
        log.info("listening on %s:%d, mode %s, engine %s, %s -> %s, limit %d connections",
                 lc.addr, lc.port, lc.mode, bc.engine, "MPTCP" if lc.client_mptcp else "TCP",
                 "MPTCP" if lc.server_mptcp else "TCP", min(self.admission.limit, self.fd_capacity * self.workers))
        log.info("policy: %s", self.policy.describe())
        return self

    def close(self) -> None:
        """Remove the rules, reset what is still open, release every fd (idempotent)."""
        if self.rules is not None:
            self.rules.remove()
        for key, p in list(self.pending.items()):
            self._refuse_pending(key, p, "converter shutting down")
        for conn, _ in list(self.conns.values()):
            self._abort(conn, "converter shutting down")
        if self.nfq is not None:
            self.nfq.unbind()
            self.nfq = None
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
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes.clear()
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
        qfd = self.nfq.get_fd()
        sfd = self.stats_sock.fileno() if self.stats_sock else -2
        link_fds = {s.fileno(): s for s in self.links.values()}
        next_sweep = time.monotonic() + 1.0
        while not done():
            try:
                events = poll(1.0)
            except InterruptedError:
                continue
            for fd, ev in events:
                entry = conns.get(fd)
                if entry is not None:
                    conn, is_client = entry
                    if is_client:
                        if ev & ~select.EPOLLOUT:
                            self.pump(conn, conn.up)
                        if ev & select.EPOLLOUT and not conn.closed:
                            self.pump(conn, conn.down)
                    else:
                        if ev & ~select.EPOLLOUT:
                            self.pump(conn, conn.down)
                        if ev & select.EPOLLOUT and not conn.closed:
                            self.pump(conn, conn.up)
                elif fd == qfd:
                    self.nfq.run(block=False)
                elif fd in lfds:
                    self._accept(lfds[fd])
                elif fd in self.pending_fds:
                    self._server_connected(fd, ev)
                elif fd in link_fds:
                    self._receive_handed(link_fds[fd])
                elif fd == sfd:
                    self._serve_stats()
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + 1.0

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
            pkt.drop() if p.pkt is not None else pkt.accept()
            return
        try:
            dst = self.redirect.destination(syn)
        except OptionError as e:
            return self._refuse(pkt, key, None, str(e))
        reason = self.policy.refusal(syn.src, dst[0], dst[1])
        if reason is None:
            if len(self.conns) // 2 + len(self.pending) >= self.fd_capacity:
                reason = f"file descriptor limit reached ({self.fd_capacity} connections per worker)"
            elif not self.admission.take():
                reason = f"connection limit {self.admission.limit} reached"
        if reason is not None:
            return self._refuse(pkt, key, dst, reason)
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
        except OSError as e:
            err = e.errno
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.admission.give()
            return self._refuse(pkt, key, dst, f"server {dst[0]}:{dst[1]}: {os.strerror(err)}")
        p = Pending(pkt, s, dst, now, try_mptcp)
        self.pending[key] = p
        self.pending_fds[s.fileno()] = (key, p)
        self.epoll.register(s.fileno(), WATCH)

    def _server_connected(self, fd: int, ev: int) -> None:
        key, p = self.pending_fds[fd]
        if p.pkt is None:
            return                # already released; waiting for accept()
        err = 0
        if ev & (select.EPOLLERR | select.EPOLLHUP) or not ev & select.EPOLLOUT:
            err = p.server.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)   # writable alone: connected
        if err:
            self.stats.errors["server " + errno.errorcode.get(err, str(err))] += 1
            return self._refuse_pending(key, p, f"server {p.dst[0]}:{p.dst[1]}: {os.strerror(err)}")
        now = time.monotonic()
        self.stats.server_connected(now - p.t_syn)
        if p.tried_mptcp:
            p.server_mptcp = mptcp.is_mptcp(p.server)
            self.servers.learn(p.dst, p.server_mptcp, now)
        p.ready_at = now
        pkt, p.pkt = p.pkt, None
        pkt.accept()              # the kernel now answers the client's SYN

    def _refuse(self, pkt, key, dst, reason: str) -> None:
        self.stats.refused[reason.split(":")[0].split(" (")[0]] += 1
        log.warning("refused %s:%d -> %s: %s", key[0], key[1], "%s:%d" % dst if dst else "?", reason)
        pkt.set_mark(REFUSE_MARK)
        pkt.accept()              # filter/INPUT answers a marked SYN with a TCP RST

    def _refuse_pending(self, key, p: Pending, reason: str) -> None:
        if self.pending.pop(key, None) is not None:
            self.admission.give()
        self.pending_fds.pop(p.server.fileno(), None)
        try:
            self.epoll.unregister(p.server.fileno())
        except (OSError, ValueError):
            pass
        p.server.close()
        if p.pkt is not None:
            self._refuse(p.pkt, key, p.dst, reason)
            p.pkt = None

    # -- accept / pair -------------------------------------------------------------------------------
    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                cs, addr = ls.accept()
            except BlockingIOError:
                return
            except OSError as e:
                self.stats.errors["accept " + errno.errorcode.get(e.errno, str(e.errno))] += 1
                return
            if self.workers > 1:
                owner = worker_of_port(addr[1], self.workers)
                if owner != self.worker:
                    self._hand_over(cs, owner)
                    continue
            cs.setblocking(False)
            self._pair(cs, addr)

    def _hand_over(self, cs: socket.socket, owner: int) -> None:
        """Another worker held this connection's SYN and has its server socket: pass the client socket."""
        try:
            socket.send_fds(self.links[owner], [b"c"], [cs.fileno()])
            self.stats.handed_over += 1
        except OSError as e:
            self.stats.errors["hand-over " + errno.errorcode.get(e.errno, str(e.errno))] += 1
            self._reset(cs)
            return
        cs.close()                # the owner has its own reference now

    def _receive_handed(self, link: socket.socket) -> None:
        while True:
            try:
                _, fds, _, _ = socket.recv_fds(link, 16, 64)
            except BlockingIOError:
                return
            for cfd in fds:
                cs = socket.socket(fileno=cfd)
                cs.setblocking(False)
                try:
                    addr = cs.getpeername()
                except OSError:
                    self._reset(cs)   # the client went away on the way here
                    continue
                self._pair(cs, addr)

    def _pair(self, cs: socket.socket, addr) -> None:
        """Pair an accepted client socket with the server socket started at its SYN; start relaying."""
        p = self.pending.get(addr)
        if p is None or p.pkt is not None:
            # No held SYN for it (e.g. it arrived while the rules were being installed): reset.
            self.stats.errors["accept without SYN"] += 1
            self._reset(cs)
            return
        del self.pending[addr]
        sfd = p.server.fileno()
        del self.pending_fds[sfd]
        self.stats.accepted += 1
        conn = Connection(cs, p.server, addr, p.dst, p.t_syn)
        conn.client_mptcp = mptcp.is_mptcp(cs)
        conn.server_mptcp = p.server_mptcp
        st = self.stats
        if conn.client_mptcp:
            st.client_mptcp += 1
        else:
            st.client_tcp += 1
        if conn.server_mptcp:
            st.server_mptcp += 1
        else:
            st.server_tcp += 1
        self._attach(conn.up)
        self._attach(conn.down)
        cfd = cs.fileno()
        self.conns[cfd] = (conn, True)
        self.conns[sfd] = (conn, False)
        self.epoll.register(cfd, WATCH)
        # the server socket is registered since connect(); ET: pump once for data already there
        self.pump(conn, conn.down)
        if not conn.closed:
            self.pump(conn, conn.up)

    def _attach(self, d: Direction) -> None:
        if self.pump == self._pump_copy:
            d.buf = memoryview(bytearray(self.cfg.buffers.pipe_size))
        # splice: a pipe is taken from the pool only while bytes are in flight (_take_pipe)

    def _take_pipe(self, d: Direction) -> None:
        if self.pipes:
            d.pipe_r, d.pipe_w = self.pipes.pop()
            return
        d.pipe_r, d.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(d.pipe_w, F_SETPIPE_SZ, self.cfg.buffers.pipe_size)
        except OSError:
            pass          # above /proc/sys/fs/pipe-max-size: keep the default

    def _give_pipe(self, d: Direction) -> None:
        """An empty pipe goes back to the pool (idle connections hold none)."""
        if len(self.pipes) < PIPE_POOL:
            self.pipes.append((d.pipe_r, d.pipe_w))
        else:
            os.close(d.pipe_r)
            os.close(d.pipe_w)
        d.pipe_r = d.pipe_w = -1

    # -- data path -------------------------------------------------------------------------------------
    def _pump_splice(self, conn: Connection, d: Direction) -> None:
        splice = os.splice
        flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
        size = self.cfg.buffers.pipe_size
        try:
            while True:
                if d.buffered:
                    try:
                        n = splice(d.pipe_r, d.dst, d.buffered, flags=flags)
                    except BlockingIOError:
                        return    # dst full: EPOLLOUT on dst resumes us
                    d.buffered -= n
                    d.bytes += n
                    continue
                if d.eof:
                    return self._finish(conn, d)
                if d.pipe_r < 0:
                    self._take_pipe(d)
                try:
                    n = splice(d.src, d.pipe_w, size, flags=flags)
                except BlockingIOError:
                    self._give_pipe(d)
                    return        # src empty: EPOLLIN on src resumes us
                if n == 0:
                    d.eof = True
                else:
                    d.buffered = n
                    conn.last = time.monotonic()
        except OSError as e:
            self._abort(conn, errno.errorcode.get(e.errno, str(e.errno)))

    def _pump_copy(self, conn: Connection, d: Direction) -> None:
        try:
            while True:
                if d.buffered:
                    try:
                        n = os.write(d.dst, d.buf[d.off:d.off + d.buffered])
                    except BlockingIOError:
                        return
                    d.off += n
                    d.buffered -= n
                    d.bytes += n
                    continue
                if d.eof:
                    return self._finish(conn, d)
                try:
                    n = os.readv(d.src, [d.buf])
                except BlockingIOError:
                    return
                if n == 0:
                    d.eof = True
                else:
                    d.off, d.buffered = 0, n
                    conn.last = time.monotonic()
        except OSError as e:
            self._abort(conn, errno.errorcode.get(e.errno, str(e.errno)))

    def _finish(self, conn: Connection, d: Direction) -> None:
        """The source said EOF and everything before it was delivered: pass the FIN on."""
        if d.done:
            return
        d.done = True
        if conn.up.done and conn.down.done:
            self._close(conn)     # close() sends this FIN: both sockets have read their EOF, so no RST
            return
        dst = conn.server if d is conn.up else conn.client
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

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
        for d in (conn.up, conn.down):
            if d.pipe_r >= 0:
                if d.buffered:      # bytes still in it (reset): the pipe is not reusable
                    os.close(d.pipe_r)
                    os.close(d.pipe_w)
                    d.pipe_r = d.pipe_w = -1
                else:
                    self._give_pipe(d)
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
        sc = self.cfg.safety
        for key, p in list(self.pending.items()):
            if p.pkt is not None and now - p.t_syn > sc.connect_timeout:
                self.stats.errors["server connect timeout"] += 1
                self._refuse_pending(key, p, f"server {p.dst[0]}:{p.dst[1]}: no answer in {sc.connect_timeout:g}s")
            elif p.pkt is None and now - p.ready_at > sc.handshake_timeout:
                self.stats.errors["client handshake timeout"] += 1
                self._refuse_pending(key, p, "client never completed its handshake")
        if sc.idle_timeout > 0:
            idle = {id(c): c for c, _ in self.conns.values() if now - c.last > sc.idle_timeout}
            for conn in idle.values():
                self._abort(conn, "idle timeout")

    def snapshot(self, connections: bool = True) -> dict:
        conns = {id(c): c for c, _ in self.conns.values()}.values()
        extra = {"active": len(conns), "pending": len(self.pending), "limit": self.admission.limit,
                 "admitted": self.admission.used, "fd_capacity": self.fd_capacity,
                 "mode": self.cfg.listener.mode, "engine": self.cfg.buffers.engine,
                 "pipes_pooled": len(self.pipes), "workers": self.workers}
        if connections:
            extra["connections"] = [c.info() for c in conns]
        return self.stats.snapshot(**extra)

    def _serve_stats(self) -> None:
        answer(self.stats_sock, self.snapshot)
