"""RFC 8803 mode: the client names its server in a Convert message at the start of its stream.

The message rides in the SYN's data (TCP Fast Open) once the client holds the kernel's TFO cookie
for the converter: the kernel then makes the connection accept()able as the SYN arrives and its
first bytes are the message, so the converter connects to the server at the SYN, as in the paper's
modes. The cookie is what makes that safe: it is a MAC of the client's address that only a host
which received one of the converter's SYN-ACKs at that address holds, so SYN data from a spoofed
address is never accepted (the kernel acknowledges only the SYN; the data must come again after
a handshake that a spoofer cannot complete). A client without a cookie asks for one in its first
SYN and sends its message after the handshake: one round trip more, once per client address. Refusals are
not RSTs here but Error TLVs at the start of the converter's stream (then the connection closes),
so a client learns why. Wire format: mimbox.wire.rfc8803.
"""
from __future__ import annotations

import contextlib
import hmac
import socket

from mimbox.converter.synpath import Cause
from mimbox.wire import rfc8803
from mimbox.wire.rfc8803 import ConvertError, Error, Message

TCP_FASTOPEN_NO_COOKIE = 34
TFO_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
TFO_SERVER = 0x2

# what a client is told for each refusal cause of the converter
ERROR_OF_CAUSE = {
    Cause.BAD_OPTION: Error.MALFORMED_MESSAGE,
    Cause.NO_DESTINATION: Error.MALFORMED_MESSAGE,
    Cause.CLIENT_NOT_ALLOWED: Error.NOT_AUTHORIZED,
    Cause.DESTINATION_DENIED: Error.NOT_AUTHORIZED,
    Cause.FD_LIMIT: Error.RESOURCE_EXCEEDED,
    Cause.CONNECTION_LIMIT: Error.RESOURCE_EXCEEDED,
    Cause.PENDING_LIMIT: Error.RESOURCE_EXCEEDED,
    Cause.SERVER_REFUSED: Error.CONNECTION_RESET,
    Cause.SERVER_UNREACHABLE: Error.DESTINATION_UNREACHABLE,
    Cause.SERVER_TIMEOUT: Error.DESTINATION_UNREACHABLE,
    Cause.SERVER_ERROR: Error.NETWORK_FAILURE,
    Cause.HANDSHAKE_TIMEOUT: Error.MALFORMED_MESSAGE,
    Cause.SHUTTING_DOWN: Error.RESOURCE_EXCEEDED,
    Cause.CONFLICTING_DESTINATION: Error.NOT_AUTHORIZED,   # (explicit mode only)
    Cause.BAD_SOURCE: Error.NOT_AUTHORIZED,
    Cause.MEMORY_PRESSURE: Error.RESOURCE_EXCEEDED,
}


def error_for(cause: Cause) -> bytes:
    """The Convert message that tells a client the converter refused it for `cause`."""
    return rfc8803.error_reply(ERROR_OF_CAUSE.get(cause, Error.NETWORK_FAILURE))


class Greeting:
    """An accepted client whose Convert message is (partly) still on its way."""
    __slots__ = ("sock", "addr", "buf", "t", "msg", "reply", "counted", "prefix")

    def __init__(self, sock: socket.socket, addr, now: float, counted: bool = True):
        self.sock, self.addr, self.buf, self.t, self.msg = sock, addr, b"", now, None
        self.reply: bytes | None = None     # an answer waiting for the client's handshake to complete
        self.counted = counted              # the core counts it (a greeting), else an answer only
        self.prefix = b""                   # its client /24 or /64 (mimbox.converter.greetings: silent ones by prefix)

    def feed(self, data: bytes) -> Message | None:
        """Add bytes; the message once complete (None before); ConvertError for a bad one."""
        self.buf += data
        self.msg = rfc8803.parse(self.buf)
        if self.msg is None and len(self.buf) >= rfc8803.MAX_MESSAGE:
            raise ConvertError(Error.MALFORMED_MESSAGE, f"no complete message in {len(self.buf)} bytes")
        return self.msg

    @property
    def early_data(self) -> bytes:
        """The application's bytes that came after the message (for the server, first)."""
        return self.buf[self.msg.length:] if self.msg else b""


TCP_SYN_RECV = 3


def handshake_pending(sock: socket.socket) -> bool:
    """Whether `sock`, accepted at its TFO SYN, still waits for the client's ACK. Linux 6.18 never
    sends what is written to such an MPTCP socket before its handshake is complete (native/core/
    dir.c client_ready): an answer waits for the EPOLLOUT that says it is."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_SYN_RECV
    except OSError:
        return False


def answer_and_end(sock: socket.socket, reply: bytes) -> None:
    """Send a client the converter's Convert message and end the stream (FIN); it may be gone."""
    try:
        sock.send(reply)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass                  # the client is gone (reset, or never completed its handshake)


def check_options(msg: Message) -> None:
    """Raise ConvertError when the Connect TLV asks for TCP options towards the server: this
    converter lets its kernel choose them (only padding, EOL and NOP, is accepted)."""
    asked = msg.tcp_options.rstrip(b"\0").replace(b"\1", b"")
    if asked:
        raise ConvertError(Error.UNSUPPORTED_TCP_OPTION, f"TCP option kind {asked[0]} requested")


def check_cookie(msg: Message, required: bytes | None) -> None:
    """Raise ConvertError when the converter requires a cookie the message lacks or gets wrong."""
    if required is None:
        return
    if msg.cookie is None:
        raise ConvertError(Error.MISSING_COOKIE, "no Cookie TLV")
    if not hmac.compare_digest(msg.cookie.rstrip(b"\0"), required.rstrip(b"\0")):    # constant time
        raise ConvertError(Error.NOT_AUTHORIZED, "wrong cookie")


def prepare_listener(ls: socket.socket, backlog: int, require_cookie: bool = True) -> None:
    """Accept SYN data on this listener from clients holding the kernel's TFO cookie (the server
    side of TFO must also be on in the namespace: see fastopen_server()). require_cookie=False takes
    SYN data from anyone (experiments on the kernel alone, never the converter: a spoofed SYN's
    data would be read before its sender proved its address)."""
    ls.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, backlog)
    if not require_cookie:
        ls.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_NO_COOKIE, 1)


@contextlib.contextmanager
def fastopen_server():
    """Turn on the server side of TCP Fast Open in this network namespace for the converter's life
    (the kernel ignores SYN data otherwise), and restore the setting afterwards."""
    with open(TFO_SYSCTL) as f:
        old = int(f.read())
    changed = not old & TFO_SERVER
    if changed:
        with open(TFO_SYSCTL, "w") as f:
            f.write(str(old | TFO_SERVER))
    try:
        yield
    finally:
        if changed:
            with open(TFO_SYSCTL, "w") as f:
                f.write(str(old))



def probe() -> str:
    """Try convert mode's transport here (run inside a throwaway namespace by `mimbox doctor`): an
    MPTCP listener taking SYN data from a client holding its TFO cookie (got on a first connection),
    a client sending its first bytes in the SYN. Returns what happened; raises RuntimeError if the
    data did not ride in the SYN."""
    import subprocess
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    def passive() -> int:
        rows = [line.split() for line in open("/proc/net/netstat") if line.startswith("TcpExt:")]
        return int(dict(zip(rows[0][1:], rows[1][1:])).get("TCPFastOpenPassive", 0))
    with fastopen_server():
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
        prepare_listener(ls, 8)
        ls.bind(("127.0.0.1", 0))
        ls.listen(8)
        for attempt in ("cookie", "probe"):      # the first connection gets the cookie
            before = passive()
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
            c.sendto(attempt.encode(), 0x20000000, ls.getsockname())       # MSG_FASTOPEN
            s, _ = ls.accept()
            got = s.recv(16)
            s.close()
            c.close()
        if got != b"probe" or passive() - before != 1:
            raise RuntimeError(f"SYN data not accepted as such (got {got!r})")
    return "MPTCP listener took SYN data from a client with its TFO cookie"
