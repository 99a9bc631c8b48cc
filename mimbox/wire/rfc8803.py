"""RFC 8803, the 0-RTT TCP Convert Protocol: its wire format, declared once.

The client starts its byte stream (in the SYN's data, with TCP Fast Open) with a Convert message:
a fixed header and TLVs; the converter answers with a Convert message at the start of its own
stream, before the server's bytes. Lengths count 32-bit words.

    fixed header   | version = 1 (8) | total length, words (8) | unassigned (16, see HEADER_FIELD) |
    TLV            | type (8)        | length, words (8)       | value ...       |
    Connect  (10)  | 10 | len | remote port (16) | remote address (128, IPv4 as ::ffff:a.b.c.d) | TCP options |
    Info     (1)   | 1  | 1   | zero (16) |
    Supported (21) | 21 | len | unassigned (16) | option kinds (8 each), zero-padded |
    Ext. TCP header (20) | 20 | len | unassigned (16) | TCP options of the server's SYN-ACK |
    Cookie   (22)  | 22 | len | zero (16) | opaque cookie |
    Error    (30)  | 30 | len | error code (8) | value |

`parse()` never raises anything but `ConvertError` (whose code is the Error TLV to answer with),
and returns None while a message is incomplete.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from mimbox.wire import addrs

VERSION = 1
WORD = 4
HEADER = struct.Struct("!BBH")          # version, total length (words), unassigned
TLV = struct.Struct("!BB")              # type, length (words)
CONNECT = struct.Struct("!BBH16s")      # type, length, remote port, remote address
MAX_MESSAGE = 255 * WORD                # the total length is one byte of words
# The fixed header's 16-bit field after Total Length. RFC 8803 (Figure 5) calls it Unassigned: this
# converter sends it as zero and never checks what a client puts there. The drafts before the RFC
# (draft-ietf-tcpm-converters up to -05, libconvert's "based on") called it a magic number, 0x2263,
# and Tessares' libconvert, the one public Convert client, refuses every answer without it
# (convert_parse_header). `--convert-compat draft` writes 0x2263 for such clients; off by default.
HEADER_FIELD = {"rfc": 0, "draft": 0x2263}


class Tlv(enum.IntEnum):
    INFO = 1
    CONNECT = 10
    EXTENDED_TCP_HEADER = 20
    SUPPORTED_TCP_EXTENSIONS = 21
    COOKIE = 22
    ERROR = 30


class Error(enum.IntEnum):
    """Error TLV codes (RFC 8803 §6; IANA "Convert Errors")."""
    UNSUPPORTED_VERSION = 0
    MALFORMED_MESSAGE = 1
    UNSUPPORTED_MESSAGE = 2
    MISSING_COOKIE = 3
    NOT_AUTHORIZED = 32
    UNSUPPORTED_TCP_OPTION = 33
    RESOURCE_EXCEEDED = 64
    NETWORK_FAILURE = 65
    CONNECTION_RESET = 96
    DESTINATION_UNREACHABLE = 97


class ConvertError(ValueError):
    """A message the converter refuses; `code` is the Error TLV it answers with."""

    def __init__(self, code: Error, detail: str):
        super().__init__(f"{code.name.lower().replace('_', ' ')}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Message:
    """A parsed client message; `length` bytes of the stream were the message (the rest is data)."""
    length: int
    connect: tuple[str, int] | None = None
    tcp_options: bytes = b""
    info: bool = False
    cookie: bytes | None = None


def parse(buf: bytes) -> Message | None:
    """The Convert message at the start of `buf`; None until all of its bytes are there."""
    if len(buf) < HEADER.size:
        return None
    version, words, _ = HEADER.unpack_from(buf)
    if version != VERSION:
        raise ConvertError(Error.UNSUPPORTED_VERSION, f"version {version}")
    length = words * WORD
    if length < HEADER.size:
        raise ConvertError(Error.MALFORMED_MESSAGE, f"total length {words} words")
    if len(buf) < length:
        return None
    connect, options, info, cookie = None, b"", False, None
    off = HEADER.size
    while off < length:
        if length - off < TLV.size:
            raise ConvertError(Error.MALFORMED_MESSAGE, f"TLV header cut at byte {off}")
        kind, tlv_words = TLV.unpack_from(buf, off)
        end = off + tlv_words * WORD
        if tlv_words == 0 or end > length:
            raise ConvertError(Error.MALFORMED_MESSAGE, f"TLV {kind} of {tlv_words} words at byte {off}")
        if kind == Tlv.CONNECT:
            if connect is not None:
                raise ConvertError(Error.MALFORMED_MESSAGE, "two Connect TLVs")
            if end - off < CONNECT.size:
                raise ConvertError(Error.MALFORMED_MESSAGE, f"Connect TLV of {tlv_words} words")
            _, _, port, addr = CONNECT.unpack_from(buf, off)
            connect = (addrs.text(addr), port)
            options = bytes(buf[off + CONNECT.size:end])
        elif kind == Tlv.INFO:
            info = True
        elif kind == Tlv.COOKIE:
            cookie = bytes(buf[off + 4:end])
        else:
            raise ConvertError(Error.UNSUPPORTED_MESSAGE, f"TLV type {kind} from a client")
        off = end
    if connect is None and not info:
        raise ConvertError(Error.MALFORMED_MESSAGE, "neither Connect nor Info TLV")
    return Message(length, connect, options, info, cookie)


def _message(*tlvs: bytes) -> bytes:
    body = b"".join(tlvs)
    return HEADER.pack(VERSION, (HEADER.size + len(body)) // WORD, 0) + body


def for_clients(message: bytes, compat: str) -> bytes:
    """`message` with its header field as `compat` clients expect it (HEADER_FIELD: rfc, draft)."""
    return message[:2] + HEADER_FIELD[compat].to_bytes(2, "big") + message[4:]


def _tlv(kind: Tlv, value: bytes) -> bytes:
    """A TLV of `kind`, zero-padded to whole words."""
    raw = TLV.pack(kind, 0) + value
    raw += b"\0" * (-len(raw) % WORD)
    if len(raw) // WORD > 255:
        raise ValueError(f"{kind.name} TLV too long ({len(raw)} bytes)")
    return bytes([kind, len(raw) // WORD]) + raw[2:]


def connect_message(addr: str, port: int, tcp_options: bytes = b"", cookie: bytes | None = None) -> bytes:
    """A client's Convert message asking for a connection to addr:port."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port}")
    tlvs = [_tlv(Tlv.CONNECT, struct.pack("!H16s", port, addrs.packed(addr)) + tcp_options)]
    if cookie is not None:
        tlvs.append(_tlv(Tlv.COOKIE, b"\0\0" + cookie))
    return _message(*tlvs)


def info_message() -> bytes:
    """A client's Convert message asking which TCP extensions the converter supports."""
    return _message(_tlv(Tlv.INFO, b"\0\0"))


def success_reply(server_tcp_options: bytes = b"") -> bytes:
    """The converter's answer once the server accepted: the server's SYN-ACK options (what of them
    the converter knows) in an Extended TCP Header TLV."""
    return _message(_tlv(Tlv.EXTENDED_TCP_HEADER, b"\0\0" + server_tcp_options))


def supported_reply(kinds: bytes) -> bytes:
    """The answer to an Info TLV: the TCP option kinds the converter supports."""
    return _message(_tlv(Tlv.SUPPORTED_TCP_EXTENSIONS, b"\0\0" + kinds))


def error_reply(code: Error, value: bytes = b"") -> bytes:
    """The converter's answer when it cannot serve: one Error TLV."""
    return _message(_tlv(Tlv.ERROR, bytes([code]) + value))


@dataclass(frozen=True)
class Reply:
    """A converter's answer as the client reads it."""
    length: int
    error: Error | int | None = None
    supported: bytes | None = None
    server_options: bytes | None = None


def parse_reply(buf: bytes) -> Reply | None:
    """The converter's Convert message at the start of `buf` (None until complete)."""
    if len(buf) < HEADER.size:
        return None
    version, words, _ = HEADER.unpack_from(buf)
    length = words * WORD
    if version != VERSION or length < HEADER.size:
        raise ConvertError(Error.MALFORMED_MESSAGE, f"reply version {version}, {words} words")
    if len(buf) < length:
        return None
    error = supported = server_options = None
    off = HEADER.size
    while off < length:
        if length - off < TLV.size:
            raise ConvertError(Error.MALFORMED_MESSAGE, "reply TLV cut")
        kind, tlv_words = TLV.unpack_from(buf, off)
        end = off + tlv_words * WORD
        if tlv_words == 0 or end > length:
            raise ConvertError(Error.MALFORMED_MESSAGE, f"reply TLV {kind} of {tlv_words} words")
        if kind == Tlv.ERROR:
            code = buf[off + 2]
            error = Error(code) if code in Error._value2member_map_ else code
        elif kind == Tlv.SUPPORTED_TCP_EXTENSIONS:
            supported = bytes(buf[off + 4:end]).rstrip(b"\0")
        elif kind == Tlv.EXTENDED_TCP_HEADER:
            server_options = bytes(buf[off + 4:end])
        off = end
    return Reply(length, error, supported, server_options)


# TCP option kinds this converter's kernel negotiates on its own connections (answer to Info)
SUPPORTED_KINDS = bytes([2, 3, 4, 8, 30])   # MSS, window scale, SACK permitted, timestamps, MPTCP


def c_header() -> str:
    """The constants of native/convertize.c (the RFC 8803 client shim), generated from this module."""
    connect_len = HEADER.size + CONNECT.size              # the fixed header, and a Connect TLV without options
    return "\n".join([
        "/* Generated by `python -m mimbox.wire.rfc8803 --header` from mimbox/wire/rfc8803.py: do not edit. */",
        "#pragma once",
        f"#define CONVERT_VERSION {VERSION}",
        f"#define CONVERT_WORD {WORD}",
        f"#define TLV_CONNECT {int(Tlv.CONNECT)}",
        f"#define TLV_ERROR {int(Tlv.ERROR)}",
        "/* the fixed header (1 word) and a Connect TLV without options (type, length, port, 16-byte address) */",
        f"#define CONNECT_LEN {connect_len}",
        f"#define CONNECT_TLV_WORDS {CONNECT.size // WORD}",
        ""])


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser(description="RFC 8803 layout tools")
    ap.add_argument("--header", action="store_true", help="print the C header of the client shim")
    if ap.parse_args().header:
        sys.stdout.write(c_header())
