"""The converter between IP families, in the Fig. 3 testbed built dual-stack: IPv6 on both sides,
IPv6 clients to IPv4 servers and IPv4 clients to IPv6 servers (the converter translates the
family), in every mode, byte-exact. One converter per mode listens on `[::]` and serves every
family case (transparent mode relays to the address the client asked for: same family only).

Explicit mode towards an IPv6 server puts DST_OPT's 22-byte IPv6 form in the client's SYN, which
fits only without TCP timestamps (results/dstopt_room): those cases run with the client's
timestamps off, as docs/running.md#ipv6 tells users to.
"""
from __future__ import annotations

import pytest
from conftest import SERVER_PORT, run_client, transfer

from experiments.systems import MiMBox

MODES = ("explicit", "transparent", "static", "convert")
# (mode, client family, server family); transparent mode relays to the address the client asked
# for, so its client and server are of one family
CASES = [(mode, c, s) for mode in MODES for c, s in ((6, 6), (6, 4), (4, 6)) if mode != "transparent" or c == s]


@pytest.fixture(scope="module", params=CASES, ids=lambda p: f"{p[0]}-v{p[1]}-to-v{p[2]}")
def case(request):
    return request.param


@pytest.fixture(scope="module")
def tb(case, paper_tb):
    """The testbed as this case's client and server see it; client timestamps off where DST_OPT's
    IPv6 form must fit."""
    mode, client, server = case
    no_ts = mode == "explicit" and server == 6
    if no_ts:
        paper_tb.client.cmd("sysctl -qw net.ipv4.tcp_timestamps=0")
    yield paper_tb.view(client, server)
    if no_ts:
        paper_tb.client.cmd("sysctl -qw net.ipv4.tcp_timestamps=1")


@pytest.fixture(scope="module")
def converter(case, tb):
    """A converter of the case's mode on [::] (it serves both families)."""
    m = MiMBox(mode=case[0], listen="::", extra=["--workers", "1", "--server-mptcp-retry", "0"])
    m.fastopen = False      # as in test_converter: SYN data with 8 MB over MPTCP stalls this kernel
    m.start(tb, SERVER_PORT)
    yield m
    m.stop()


def family(addr: str) -> int:
    """4 or 6: what an address really is (an IPv4-mapped IPv6 address is IPv4 on the wire)."""
    import ipaddress
    ip = ipaddress.ip_address(addr.strip("[]"))
    return 4 if ip.version == 4 or ip.ipv4_mapped else 6


def crossed(tb, c: dict, s: dict) -> tuple[dict, dict]:
    """Assert the client's connection was of the client's family and the server's of the server's."""
    assert family(c["local"]) == tb.client_family, c
    assert family(s["peer"].rsplit(":", 1)[0]) == tb.server_family, s
    return c, s


@pytest.mark.parametrize("size", [1, 8 << 20 | 12345])
def test_mptcp_client_to_tcp_server(tb, converter, size):
    """MPTCP client, TCP server, across families; every byte compared, both ways at once."""
    before = converter.stats()
    c, s = crossed(tb, *transfer(tb, converter, up=size, down=size * 2 + 1, client_mptcp=True, server_mptcp=False))
    assert c["mptcp"] is True and s["mptcp"] is False
    assert converter.stats()["accepted"] - before["accepted"] == 1, "the converter did not carry it"


def test_tcp_client_to_mptcp_server(tb, converter):
    """A plain TCP client reaches an MPTCP server in the other family, which sees MPTCP."""
    c, s = crossed(tb, *transfer(tb, converter, up=1 << 20, down=1 << 20, client_mptcp=False, server_mptcp=True))
    assert c["mptcp"] is False and s["mptcp"] is True


@pytest.mark.parametrize("order", ["client-first", "server-first"])
def test_half_close_crosses_families(tb, converter, order):
    """shutdown(SHUT_WR) crosses the family boundary; the other direction still delivers."""
    crossed(tb, *transfer(tb, converter, up=300_000, down=500_000, order=order))


def test_two_subflows_each_side(tb, converter):
    """Two subflows client-side in the client's family, two server-side in the server's."""
    before = converter.stats()
    c, s = crossed(tb, *transfer(tb, converter, up=1 << 20, down=1 << 20, order="server-first", client_mptcp=True,
                                 server_mptcp=True, wait_subflows=2, server_wait_subflows=2))
    assert c["subflows"] == 2 and s["subflows"] == 2, (c, s)
    st = converter.stats()
    assert st["client_mptcp"] - before["client_mptcp"] == 1 and st["server_mptcp"] - before["server_mptcp"] == 1


def test_server_refusal_gives_rst(tb, converter):
    """Nothing listens on the server's port: the client's connect() fails with a reset."""
    before = converter.stats()["refused"].get("server refused", 0)
    r = run_client(tb, converter, SERVER_PORT, 10, 10)
    assert r.get("errno") == 111, r
    assert converter.stats()["refused"].get("server refused", 0) - before == 1
