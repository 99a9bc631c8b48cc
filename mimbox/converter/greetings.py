"""Convert mode's clients before they are connections (RFC 8803, mimbox.converter.convert): the core
accepts and admits them (native/core/accept.c greet()) and hands each here as a greeting; this reads
its Convert message, answers what is not a connection (Info, errors), and gives the rest back to the
core (core_convert_connect: the destination checked, the server connected, bytes relayed).

    greetings = Greetings(relay)
    greetings.accepted(cs, addr)       # EV_ACCEPTED
    greetings.readable(fd)             # EV_FD on one of them (fd in greetings)
    greetings.give_back(cs, addr, c)   # EV_GIVEBACK: refused by the core, told why by an Error TLV
    greetings.sweep(now)               # once a second: messages that never came
"""
from __future__ import annotations

import logging
import select
import socket
import struct
import time

from mimbox.codes import GATE_ADDRESS_FULL, GATE_PREFIX_FULL
from mimbox.config import hostport
from mimbox.converter import convert as converting
from mimbox.converter.synpath import Cause, refusal_reason
from mimbox.converter.timers import due
from mimbox.wire import rfc8803
from mimbox.wire.addrs import gate_prefix

log = logging.getLogger("mimbox")
LINGER_RST = struct.pack("ii", 1, 0)


def reset(s: socket.socket) -> None:
    """Close `s` with RST."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    except OSError:
        pass                  # the socket is closing anyway
    s.close()


class Greetings:
    """The greetings of one worker, by fd. `relay` gives the core, configuration, policy, counters and
    log (read at each use: a reload replaces them)."""

    def __init__(self, relay):
        self.relay = relay
        self.by_fd: dict[int, converting.Greeting] = {}
        # greetings that have not sent a byte yet, by client prefix, oldest first (dicts keep order):
        # what a newcomer beyond a cap may reset, found without a scan
        self.silent: dict[bytes, dict[int, converting.Greeting]] = {}

    def __contains__(self, fd: int) -> bool:
        return fd in self.by_fd

    def __len__(self) -> int:
        return len(self.by_fd)

    def accepted(self, cs: socket.socket, addr, full: int = 0) -> None:
        """A client the core accepted and admitted: its message is read from now on. full: the gate
        turned it away (GATE_*: its address's cap, its prefix's, or the worker's): admitted if the
        greetings before it have left since, else the oldest silent greeting under that cap is reset
        to make room, else it is refused with Resource Exceeded."""
        prefix = gate_prefix(addr[0])
        if full and not self._make_room(cs, addr, prefix):
            return
        g = converting.Greeting(cs, addr, time.monotonic())
        g.prefix = prefix
        self.by_fd[cs.fileno()] = g
        self.silent.setdefault(g.prefix, {})[cs.fileno()] = g
        self.relay.core.watch(cs.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        self._read(g)              # with TFO the message came in the SYN: it is there already

    def _spoke(self, g: converting.Greeting) -> None:
        """g is silent no more (its first bytes came, or it ended)."""
        same = self.silent.get(g.prefix)
        if same is not None and same.pop(g.sock.fileno(), None) is not None and not same:
            del self.silent[g.prefix]

    def _make_room(self, cs: socket.socket, addr, prefix: bytes) -> bool:
        """Admit addr (of `prefix`) now if the greetings before it have left (a batch of accepts is
        counted before their messages are read); else reset the oldest silent greeting under the cap
        it still meets (its address's, its /24's or /64's, or the worker's: GATE_*) and admit it in its
        place. False: refused (answered Resource Exceeded)."""
        r = self.relay
        refused = r.core.greeting_admit(addr, count=False)
        if refused is None:
            return True
        mine = self.silent.get(prefix, {})
        if refused[1] == GATE_ADDRESS_FULL:
            victims = [next((g for g in mine.values() if g.addr[0] == addr[0]), None)]
        elif refused[1] == GATE_PREFIX_FULL:
            victims = [next(iter(mine.values()), None)]
        else:                            # the worker's cap: the oldest silent one of any prefix
            victims = [next(iter(same.values())) for same in self.silent.values()]
        victims = [g for g in victims if g is not None]
        if victims:
            victim = min(victims, key=lambda g: g.t)
            r.stats.errors["silent greeting reset for a newcomer"] += 1
            self._drop(victim, rst=True)
            refused = r.core.greeting_admit(addr)
        if refused is None:
            return True
        cause = refused[0]
        if not victims:                  # (else the core counted it)
            r.stats.refused[cause.value] += 1
        r.refusals.refused(cause, f"{hostport(*addr)} -> ? (after accept: a cap of waiting clients, none of "
                                  f"them silent to make room)")
        self.give_back(cs, addr, cause)   # RFC 8803: Resource Exceeded, once its handshake is complete
        return False

    def readable(self, fd: int) -> None:
        self._read(self.by_fd[fd])

    def give_back(self, cs: socket.socket, addr, cause: Cause) -> None:
        """A client the core refused after accepting it: an Error TLV says why."""
        self._answer(converting.Greeting(cs, addr, time.monotonic(), counted=False), converting.error_for(cause))

    def drop(self, fd: int) -> None:
        """End the greeting on `fd` (an internal error while serving it)."""
        if fd in self.by_fd:
            self._drop(self.by_fd[fd])

    def _read(self, g: converting.Greeting) -> None:
        r = self.relay
        if g.reply is not None:          # an answer waiting for the client's handshake
            if not converting.handshake_pending(g.sock):
                converting.answer_and_end(g.sock, g.reply)
                self._drop(g)
            return
        try:
            data = g.sock.recv(rfc8803.MAX_MESSAGE - len(g.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(g)                # gone before its message was complete
            return
        if not g.buf:
            self._spoke(g)
        try:
            msg = g.feed(data)
            if msg is None:
                return
            converting.check_cookie(msg, r.cfg.listener.convert_cookie)    # constant time
            converting.check_options(msg)
        except rfc8803.ConvertError as e:
            self._answer(g, rfc8803.error_reply(e.code))
            r.stats.refused[Cause.BAD_OPTION.value] += 1
            r.refusals.refused(Cause.BAD_OPTION, "%s: Convert message: %s" % (hostport(*g.addr), e))
            return
        if msg.connect is None:          # an Info request: what this converter supports, then close
            self._answer(g, rfc8803.supported_reply(rfc8803.SUPPORTED_KINDS))
            return
        del self.by_fd[g.sock.fileno()]
        r.core.unwatch(g.sock.fileno())
        r.core.greeting_end(g.addr[0], keep_admission=True)
        dst = msg.connect                # IPv4 or IPv6, whatever the client's family
        refused = r.core.convert_connect(g.sock.fileno(), g.addr, dst, g.t, self.wire(rfc8803.success_reply()),
                                         g.early_data)
        if refused is None:
            g.sock.detach()              # the core's now
            return
        cause, detail, err = refused     # counted by the core
        self._refuse(g.sock, g.addr, dst, cause, refusal_reason(cause, detail, 0, err, g.addr[0], dst, r.policy))

    def _refuse(self, cs: socket.socket, addr, dst, cause: Cause, detail: str) -> None:
        self.relay.refusals.refused(cause, f"{hostport(*addr)} -> {hostport(*dst) if dst else '?'} (after accept"
                                           + (f": {detail})" if detail else ")"))
        converting.answer_and_end(cs, self.wire(converting.error_for(cause)))    # RFC 8803: an Error TLV says why
        cs.close()

    def wire(self, reply: bytes) -> bytes:
        """`reply` as this converter's clients expect its header (--convert-compat)."""
        return rfc8803.for_clients(reply, self.relay.cfg.listener.convert_compat)

    def _answer(self, g: converting.Greeting, reply: bytes) -> None:
        """Send `reply` and end the stream, once the client's handshake is complete (an answer written
        to an MPTCP socket before then is never sent: converting.handshake_pending)."""
        reply = self.wire(reply)
        if converting.handshake_pending(g.sock):
            if not g.counted and self.waiting_answers() >= self.relay.cfg.listener.pending_limit:
                reset(g.sock)            # not counted as a greeting: capped here, or an fd each
                return
            g.reply = reply
            self.by_fd[g.sock.fileno()] = g
            self.relay.core.watch(g.sock.fileno(), select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET)
            return
        converting.answer_and_end(g.sock, reply)
        self._drop(g)

    def waiting_answers(self) -> int:
        """Refused clients (no longer counted as greetings) whose answer waits for their handshake."""
        return sum(1 for g in self.by_fd.values() if not g.counted)

    def _drop(self, g: converting.Greeting, rst: bool = False) -> None:
        if g.counted and not g.buf:
            self._spoke(g)
        if self.by_fd.pop(g.sock.fileno(), None) is not None:
            self.relay.core.unwatch(g.sock.fileno())
            if g.counted:
                self.relay.core.greeting_end(g.addr[0], keep_admission=False)
                g.counted = False
        if rst:
            reset(g.sock)
        else:
            g.sock.close()

    def sweep(self, now: float) -> None:
        """Once a second (mimbox.converter.timers decides): a message that never came is answered; an answer
        whose client never completed its handshake is dropped."""
        r = self.relay
        late = due(r.timeouts, now, self.by_fd.values())
        for g in late.silent:            # connected, and not a byte: a place held for nothing
            r.stats.errors["convert client silent"] += 1
            self._drop(g, rst=True)
        for g in late.greetings:
            if g.reply is not None:      # its handshake never completed: nobody to answer
                r.stats.errors["client handshake timeout"] += 1
                self._drop(g)
                continue
            r.stats.errors["convert message timeout"] += 1
            self._answer(g, rfc8803.error_reply(rfc8803.Error.MALFORMED_MESSAGE))
        for g in [g for g in self.by_fd.values() if g.reply is not None]:
            self._read(g)                # (its EPOLLOUT edge should have come already)

    def close(self) -> None:
        for g in list(self.by_fd.values()):
            self._drop(g)
