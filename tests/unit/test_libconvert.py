"""RFC 8803 interop with the one public Convert client, Tessares' libconvert: its own encoder and
parser (tests/interop/libconvert/convert_util.c, unchanged, built here) against mimbox/wire/rfc8803.py.

libconvert writes a Connect of 5 words (port, address as ::ffff:a.b.c.d or IPv6) in a header whose
16-bit field is 0x2263, and refuses an answer whose header lacks that value (convert_parse_header);
RFC 8803 calls the field Unassigned. So: our parser takes libconvert's messages as they are, our
answers pass libconvert's parser with --convert-compat draft, and RFC-mode answers are what
libconvert refuses (the reason the switch exists)."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from mimbox.wire import addrs, rfc8803
from mimbox.wire.rfc8803 import Error

SRC = Path(__file__).resolve().parents[1] / "interop" / "libconvert"
F_CONNECT, F_EXTENDED_TCP_HDR, F_COOKIE, F_ERROR = 1 << 1, 1 << 2, 1 << 4, 1 << 5


class SockaddrIn6(ctypes.Structure):
    _fields_ = [("family", ctypes.c_uint16), ("port", ctypes.c_uint16), ("flowinfo", ctypes.c_uint32),
                ("addr", ctypes.c_uint8 * 16), ("scope_id", ctypes.c_uint32)]


class ConvertOpts(ctypes.Structure):
    """libconvert's struct convert_opts (convert_util.h)."""
    _fields_ = [("flags", ctypes.c_uint8), ("remote_addr", SockaddrIn6), ("error_code", ctypes.c_uint8),
                ("tcp_options", ctypes.POINTER(ctypes.c_uint8)), ("tcp_options_len", ctypes.c_size_t),
                ("cookie_data", ctypes.POINTER(ctypes.c_uint8)), ("cookie_len", ctypes.c_size_t)]


@pytest.fixture(scope="module")
def libconvert(tmp_path_factory):
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "a C compiler (gcc) is part of the project's set-up"
    out = tmp_path_factory.mktemp("libconvert") / "libconvert_util.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-include", "sys/types.h", "-o", str(out),
                    str(SRC / "convert_util.c")], check=True, capture_output=True, timeout=60)
    lib = ctypes.CDLL(str(out))
    lib.convert_write.restype = ctypes.c_ssize_t
    lib.convert_write.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ConvertOpts)]
    lib.convert_parse_header.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
    lib.convert_parse_tlvs.restype = ctypes.POINTER(ConvertOpts)
    lib.convert_parse_tlvs.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    lib.convert_free_opts.argtypes = [ctypes.POINTER(ConvertOpts)]
    return lib


def client_connect(lib, addr: str, port: int, cookie: bytes | None = None) -> bytes:
    """A Connect message exactly as libconvert's client writes it (convert_client.c fills these)."""
    opts = ConvertOpts(flags=F_CONNECT)
    opts.remote_addr.port = int.from_bytes(port.to_bytes(2, "big"), "little")    # network order in memory
    ctypes.memmove(opts.remote_addr.addr, addrs.packed(addr), 16)
    if cookie is not None:
        buf = (ctypes.c_uint8 * len(cookie)).from_buffer_copy(cookie)
        opts.flags |= F_COOKIE
        opts.cookie_data, opts.cookie_len = ctypes.cast(buf, ctypes.POINTER(ctypes.c_uint8)), len(cookie)
    out = ctypes.create_string_buffer(256)
    n = lib.convert_write(out, 256, ctypes.byref(opts))
    assert n > 0
    return out.raw[:n]


def client_reads(lib, answer: bytes) -> dict | None:
    """What libconvert's client makes of a converter's answer (convert_client.c's read path): None
    if it refuses it, else its flags and error code."""
    length = ctypes.c_size_t(0)
    if lib.convert_parse_header(answer[:4], 4, ctypes.byref(length)) < 0:
        return None
    if length.value == 0:
        return {"flags": 0, "error": None}
    tlvs = answer[4:4 + length.value]
    opts = lib.convert_parse_tlvs(tlvs, len(tlvs))
    if not opts:
        return None
    o = opts.contents
    got = {"flags": o.flags, "error": o.error_code if o.flags & F_ERROR else None,
           "tcp_options": bytes(o.tcp_options[:o.tcp_options_len]) if o.flags & F_EXTENDED_TCP_HDR else None}
    lib.convert_free_opts(opts)
    return got


@pytest.mark.parametrize("addr", ["192.0.2.7", "2001:db8::7"])
def test_we_parse_libconverts_connect(libconvert, addr):
    raw = client_connect(libconvert, addr, 8443, cookie=b"secret42")   # (a whole number of words: padding is the TLV's)
    assert raw[2:4] == b"\x22\x63" and raw[4] == rfc8803.Tlv.CONNECT and raw[5] == 5    # its layout
    msg = rfc8803.parse(raw + b"GET /")
    assert msg.connect == (addr, 8443) and msg.cookie == b"secret42" and msg.length == len(raw)


def test_draft_compat_answers_pass_libconverts_parser(libconvert):
    draft = lambda m: rfc8803.for_clients(m, "draft")      # noqa: E731
    ok = client_reads(libconvert, draft(rfc8803.success_reply()))
    assert ok is not None and ok["error"] is None and ok["flags"] & F_EXTENDED_TCP_HDR
    opts = bytes([2, 4, 5, 0xB4])                           # the server's SYN-ACK options, when known
    assert client_reads(libconvert, draft(rfc8803.success_reply(opts)))["tcp_options"] == opts
    for code in (Error.NOT_AUTHORIZED, Error.CONNECTION_RESET, Error.RESOURCE_EXCEEDED):
        assert client_reads(libconvert, draft(rfc8803.error_reply(code)))["error"] == code


def test_rfc_answers_are_what_libconvert_refuses(libconvert):
    """Why --convert-compat draft exists: RFC 8803's zero field fails libconvert's header check."""
    assert rfc8803.success_reply()[2:4] == b"\0\0"
    assert client_reads(libconvert, rfc8803.success_reply()) is None
    assert client_reads(libconvert, rfc8803.error_reply(Error.NOT_AUTHORIZED)) is None


def test_the_core_writes_the_configured_field_in_its_busy_answer():
    """The answer the C core writes itself (a crowd past the caps) is generated from rfc8803 and
    stamped with --convert-compat's field at run time (native/core/accept.c greet)."""
    from mimbox.config import Config, ListenerConfig
    from mimbox.converter.synplan import core_config

    class Shared:
        limit, slots, mask = 1, None, 0

        def address(self):
            return None
    for compat, field in rfc8803.HEADER_FIELD.items():
        cfg = Config(listener=ListenerConfig(mode="convert", convert_compat=compat))
        cc = core_config(cfg, worker=0, workers=1, fd_capacity=16, admission=Shared(), held=None,
                         syns_queued=False, recorder_fd=-1)
        assert cc.convert_header_field == field
    assert Config(listener=ListenerConfig(mode="convert", convert_compat="2263")).problems()
