"""The converter's data path: bytes of one direction of a connection, src socket -> dst socket.

    data = DataPath("auto", 64 << 10, finish=on_eof, abort=on_error)
    data.pump(conn, conn.up, drain)     # move what can move now; returns when a side would block
    data.release(conn.up)               # the connection ended: its pipe back to the pool

Engines: splice (socket -> pipe -> socket, no copy through user space), copy (through one buffer
per worker; what a destination does not take at once is kept in the direction, at most a buffer's
worth, and the source is not read until it is delivered), auto (copy a direction's first
SPLICE_AFTER bytes, then splice). Back-pressure: a direction reads from its source only when nothing
of it waits for the destination, so a slow reader closes the sender's window. `drain`: read until
the source is empty; without it a read that did not fill the buffer ends the call (with
edge-triggered epoll the source's next bytes raise a new edge), which saves a failing read.
"""
from __future__ import annotations

import errno
import fcntl
import os
import time

F_SETPIPE_SZ = 1031
SPLICE_F_MOVE, SPLICE_F_NONBLOCK = 1, 2
PIPE_POOL = 1024
# engine auto: a direction moves its first bytes by copying through the worker's buffer (cheapest for
# short transfers) and splices once it has moved this many (no copy through user space for bulk)
SPLICE_AFTER = 256 << 10


class Direction:
    """One way of a connection: src socket -> pipe (splice) or worker buffer (copy) -> dst socket.
    `buffered` bytes wait for dst: in the pipe, or in `buf` from `off` (what a short write left).
    `prefix`: bytes of the converter's own that go out in front of the first relayed ones, in the
    same write (convert mode's answer: a client must not wake for it alone, see flush_prefix)."""
    __slots__ = ("src", "dst", "pipe_r", "pipe_w", "buf", "off", "buffered", "eof", "done", "bytes", "prefix")

    def __init__(self, src: int, dst: int):
        self.src, self.dst = src, dst
        self.pipe_r = self.pipe_w = -1
        self.buf = None
        self.off = 0
        self.buffered = 0
        self.eof = False
        self.done = False
        self.bytes = 0
        self.prefix = b""


def write_prefixed(d: Direction, data=b"") -> None:
    """Write a direction's prefix with `data` behind it, in one write (the prefix is set before any
    relayed byte, so nothing is buffered yet); what dst does not take is kept like a short write."""
    out, plen = d.prefix + bytes(data), len(d.prefix)
    d.prefix = b""
    try:
        w = os.write(d.dst, out)
    except BlockingIOError:
        w = 0
    d.bytes += max(0, w - plen)
    if w < len(out):
        d.buf, d.off, d.buffered = out[w:], 0, len(out) - w


def flush_prefix(d: Direction) -> None:
    """Write a direction's prefix now, alone (its source stayed silent, or ended)."""
    write_prefixed(d)


class PipePool:
    """Empty pipes for splice, reused: a direction takes one only while bytes are in flight."""

    def __init__(self, pipe_size: int, size: int = PIPE_POOL):
        self.pipe_size, self.size = pipe_size, size
        self.pipes: list[tuple[int, int]] = []

    def take(self, d: Direction) -> None:
        if self.pipes:
            d.pipe_r, d.pipe_w = self.pipes.pop()
            return
        d.pipe_r, d.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(d.pipe_w, F_SETPIPE_SZ, self.pipe_size)
        except OSError:
            pass          # above /proc/sys/fs/pipe-max-size: keep the default

    def give(self, d: Direction) -> None:
        """An empty pipe goes back to the pool (idle connections hold none)."""
        if len(self.pipes) < self.size:
            self.pipes.append((d.pipe_r, d.pipe_w))
        else:
            os.close(d.pipe_r)
            os.close(d.pipe_w)
        d.pipe_r = d.pipe_w = -1

    def __len__(self) -> int:
        return len(self.pipes)

    def close(self) -> None:
        for r, w in self.pipes:
            os.close(r)
            os.close(w)
        self.pipes.clear()


class DataPath:
    """The engines of one worker. `finish(conn, d)` is called when d's source said EOF and all of
    it was delivered; `abort(conn, cause)` when a system call failed."""

    def __init__(self, engine: str, pipe_size: int, finish, abort):
        self.pipe_size = pipe_size
        self.finish, self.abort = finish, abort
        self.pool = PipePool(pipe_size)
        self.copy_buf = memoryview(bytearray(pipe_size))   # one per worker: copied bytes never stay in it
        self.copy_iov = [self.copy_buf]
        self.pump = {"splice": self.pump_splice, "copy": self.pump_copy, "auto": self.pump_auto}[engine]

    def release(self, d: Direction) -> None:
        """The connection of `d` ended: its pipe back to the pool, or closed if bytes are still in it."""
        if d.pipe_r >= 0:
            if d.buffered:      # bytes still in it (reset): the pipe is not reusable
                os.close(d.pipe_r)
                os.close(d.pipe_w)
                d.pipe_r = d.pipe_w = -1
            else:
                self.pool.give(d)

    def close(self) -> None:
        self.pool.close()

    def pump_auto(self, conn, d: Direction, drain=True) -> None:
        """Copy a direction's first SPLICE_AFTER bytes, splice the rest."""
        if d.pipe_r >= 0 or (d.bytes >= SPLICE_AFTER and not d.buffered):
            self.pump_splice(conn, d, drain)
        else:
            self.pump_copy(conn, d, drain)

    def pump_splice(self, conn, d: Direction, drain=True) -> None:
        """src -> pipe -> dst without copying through user space; `drain`: read until src is empty,
        else stop after a read that did not fill the pipe."""
        splice = os.splice
        flags = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
        size = self.pipe_size
        short = False
        if d.prefix:
            flush_prefix(d)
            if d.buffered:
                return
        try:
            while True:
                if d.buffered:
                    try:
                        n = splice(d.pipe_r, d.dst, d.buffered, flags=flags)
                    except BlockingIOError:
                        return    # dst full: EPOLLOUT on dst resumes us
                    d.buffered -= n
                    d.bytes += n
                    if d.buffered:
                        continue
                    if short and not drain:
                        self.pool.give(d)
                        return    # a short read emptied src: its next bytes raise a new edge
                if d.eof:
                    return self.finish(conn, d)
                if d.pipe_r < 0:
                    self.pool.take(d)
                try:
                    n = splice(d.src, d.pipe_w, size, flags=flags)
                except BlockingIOError:
                    self.pool.give(d)
                    return        # src empty: EPOLLIN on src resumes us
                if n == 0:
                    d.eof = True
                else:
                    d.buffered = n
                    short = n < size
                    conn.last = time.monotonic()
        except OSError as e:
            self.abort(conn, errno.errorcode.get(e.errno, str(e.errno)))

    def pump_copy(self, conn, d: Direction, drain=True) -> None:
        """src -> the worker's buffer -> dst; what dst does not take at once is kept in the direction
        (at most one buffer's worth) and src is not read until it is delivered."""
        buf = self.copy_buf
        size = len(buf)
        readv, write, iov = os.readv, os.write, self.copy_iov
        try:
            if d.buffered:
                try:
                    n = write(d.dst, d.buf[d.off:])
                except BlockingIOError:
                    return
                d.off += n
                d.buffered -= n
                d.bytes += n
                if d.buffered:
                    return        # still blocked: EPOLLOUT on dst resumes us
                d.buf = None
            while True:
                if d.eof:
                    return self.finish(conn, d)
                try:
                    n = readv(d.src, iov)
                except BlockingIOError:
                    return        # src empty: EPOLLIN on src resumes us
                if n == 0:
                    d.eof = True
                    continue
                conn.last = time.monotonic()
                if d.prefix:      # once, convert mode: the converter's answer in the same segment
                    write_prefixed(d, buf[:n])
                    if d.buffered:
                        return    # dst full: EPOLLOUT on dst resumes us
                else:
                    try:
                        w = write(d.dst, buf[:n])
                    except BlockingIOError:
                        w = 0
                    d.bytes += w
                    if w < n:
                        d.buf, d.off, d.buffered = bytes(buf[w:n]), 0, n - w
                        return    # dst full: EPOLLOUT on dst resumes us
                if n < size and not drain:
                    return        # a short read emptied src: its next bytes raise a new edge
        except OSError as e:
            self.abort(conn, errno.errorcode.get(e.errno, str(e.errno)))
