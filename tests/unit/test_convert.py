"""RFC 8803 wire format (mimbox/wire/rfc8803.py), without root: field offsets as the RFC draws them,
round trips, every error a client can cause, and 10^5 fuzzed messages."""
from __future__ import annotations

import random
import struct

import pytest

from mimbox.wire import rfc8803
from mimbox.wire.rfc8803 import ConvertError, Error


def test_connect_tlv_layout_is_the_rfcs():
    """Connect TLV: type 10, length in words, port at bytes 2-3, the 128-bit address at 4-19, an
    IPv4 address as ::ffff:a.b.c.d; the fixed header before it: version 1, total length in words."""
    m = rfc8803.connect_message("10.0.101.1", 9000)
    assert len(m) == 24 and len(m) % 4 == 0
    assert m[0] == 1 and m[1] == 6 and m[2:4] == b"\0\0"           # header: 24 bytes = 6 words
    tlv = m[4:]
    assert tlv[0] == 10 and tlv[1] == 5                            # Connect: 20 bytes = 5 words
    assert struct.unpack("!H", tlv[2:4]) == (9000,)
    assert tlv[4:20] == b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 101, 1])


def test_connect_with_options_and_cookie_round_trip():
    opts = bytes([2, 4, 5, 0xB4])                                  # MSS 1460
    m = rfc8803.connect_message("2001:db8::7", 443, tcp_options=opts, cookie=b"secret!!")
    msg = rfc8803.parse(m + b"GET / HTTP/1.1\r\n")
    assert msg.connect == ("2001:db8::7", 443) and msg.tcp_options == opts
    assert msg.cookie == b"secret!!" and msg.length == len(m)


def test_info_and_replies():
    assert rfc8803.parse(rfc8803.info_message()).info
    r = rfc8803.parse_reply(rfc8803.supported_reply(rfc8803.SUPPORTED_KINDS) + b"tail")
    assert r.supported == rfc8803.SUPPORTED_KINDS and r.error is None
    e = rfc8803.error_reply(Error.NOT_AUTHORIZED)
    assert e[4] == 30 and e[5] == 1 and e[6] == 32                 # Error TLV: code right after type, length
    assert rfc8803.parse_reply(e).error is Error.NOT_AUTHORIZED
    ok = rfc8803.parse_reply(rfc8803.success_reply())
    assert ok.error is None and ok.server_options == b""


def test_incomplete_is_none_not_an_error():
    m = rfc8803.connect_message("10.0.0.1", 80)
    for n in range(len(m)):
        assert rfc8803.parse(m[:n]) is None


@pytest.mark.parametrize("data,code", [
    (bytes([2, 6, 0, 0]) + bytes(20), Error.UNSUPPORTED_VERSION),
    (bytes([1, 0, 0, 0]), Error.MALFORMED_MESSAGE),                       # total length 0
    (bytes([1, 1, 0, 0]), Error.MALFORMED_MESSAGE),                       # no TLV at all
    (bytes([1, 2, 0, 0, 10, 1, 0, 80]), Error.MALFORMED_MESSAGE),         # Connect of 1 word
    (bytes([1, 2, 0, 0, 10, 0, 0, 0]), Error.MALFORMED_MESSAGE),          # TLV of 0 words
    (bytes([1, 2, 0, 0, 10, 9, 0, 0]), Error.MALFORMED_MESSAGE),          # TLV past the message
    (bytes([1, 2, 0, 0, 99, 1, 0, 0]), Error.UNSUPPORTED_MESSAGE),        # unknown TLV type
    (bytes([1, 2, 0, 0, 30, 1, 1, 0]), Error.UNSUPPORTED_MESSAGE),        # an Error TLV from a client
])
def test_bad_messages_name_their_error(data, code):
    with pytest.raises(ConvertError) as e:
        rfc8803.parse(data)
    assert e.value.code is code


def test_two_connects_are_malformed():
    one = rfc8803.connect_message("10.0.0.1", 80)
    two = bytes([1, one[1] + 5, 0, 0]) + one[4:] + one[4:]
    with pytest.raises(ConvertError):
        rfc8803.parse(two)


def test_fuzz_parser_raises_only_its_own_error():
    """10^5 messages: valid ones mutated (bytes flipped, cut, lengthened) and random ones."""
    rng = random.Random(8803)
    seeds = [rfc8803.connect_message("10.0.101.1", 9000), rfc8803.info_message(),
             rfc8803.connect_message("2001:db8::1", 1, tcp_options=bytes(range(12)), cookie=b"c" * 7)]
    outcomes = {"message": 0, "incomplete": 0, "refused": 0}
    for i in range(100_000):
        if i % 4 == 0:
            data = rng.randbytes(rng.randrange(0, 64))
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                op = rng.randrange(3)
                if op == 0 and data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
                elif op == 1:
                    del data[rng.randrange(len(data) + 1):]
                else:
                    data += rng.randbytes(rng.randrange(1, 16))
            data = bytes(data)
        try:
            msg = rfc8803.parse(data)
        except ConvertError as e:
            assert isinstance(e.code, Error)
            outcomes["refused"] += 1
            continue
        if msg is None:
            outcomes["incomplete"] += 1
        else:
            assert msg.length <= len(data) and (msg.connect or msg.info)
            outcomes["message"] += 1
    assert all(outcomes.values()), outcomes          # every outcome was reached
    import ledger
    ledger.add(inputs=100_000)


def test_every_refusal_cause_has_its_error():
    """What a client is told for each cause the converter refuses with (Network Failure for a server
    error that is neither a refusal, an unreachable network nor a timeout)."""
    from mimbox.converter.convert import ERROR_OF_CAUSE, check_options, error_for
    from mimbox.converter.synpath import Cause
    assert set(ERROR_OF_CAUSE) == set(Cause)
    assert rfc8803.parse_reply(error_for(Cause.SERVER_ERROR)).error is Error.NETWORK_FAILURE
    assert rfc8803.parse_reply(error_for(Cause.CONNECTION_LIMIT)).error is Error.RESOURCE_EXCEEDED
    check_options(rfc8803.parse(rfc8803.connect_message("10.0.0.1", 80, tcp_options=b"\1\1\0\0")))  # padding only
    with pytest.raises(ConvertError) as e:
        check_options(rfc8803.parse(rfc8803.connect_message("10.0.0.1", 80, tcp_options=bytes([8, 10, 0, 0]))))
    assert e.value.code is Error.UNSUPPORTED_TCP_OPTION
