"""RFC 8803 convert mode, for real (the byte-exact matrix runs it too: tests/test_converter.py):
SYN data carrying the Convert message and the application's first bytes, every Error the
converter emits read off the wire, Info, fuzzed messages over the wire, and unchanged programs
(curl, wrk, iperf3) through `mimbox client --convert`."""
from __future__ import annotations

import json
import os
import random
import shlex
import subprocess

import pytest
from conftest import PY, SERVER_PORT, Server, readline, transfer
from topologies.support import free_port, wait_until

from experiments.systems import MiMBox
from mimbox.wire import rfc8803
from mimbox.wire.rfc8803 import Error

# the server side's ports of this module's own servers (topologies.support allocates them)
BLACKHOLE_PORT, CLOSED_PORT, IPERF_PORT, WEB_PORT, BIG_WEB_PORT = (free_port() for _ in range(5))

PROBE = os.path.join(os.path.dirname(__file__), "tools", "convert_probe.py")


def probe(tb, port: int, message: bytes, read_after: int = 0, mptcp: bool = True) -> dict:
    """Send `message` in a TFO SYN to the converter on `port`; what came back (see the tool)."""
    out = tb.client.cmd(f"{PY} {PROBE} {tb.mbox_client_ip} {port} {message.hex() or '00'} "
                        f"--read-after-reply {read_after}" + (" --mptcp" if mptcp else ""))
    lines = [x for x in out.splitlines() if x.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


def get_tfo_cookie(tb, port: int) -> None:
    """The client's kernel asks the converter for its TFO cookie (an Info request, answered and
    closed): from then on the client's SYNs to it carry data (the converter takes none without)."""
    r = probe(tb, port, rfc8803.info_message())
    assert r["error"] is None and r["supported"], r


@pytest.fixture(scope="module")
def conv(paper_tb):
    m = MiMBox(mode="convert", workers=1, extra=["--connect-timeout", "1", "--max-connections", "4"])
    m.start(paper_tb, SERVER_PORT)
    get_tfo_cookie(paper_tb, m.port)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def conv_open(paper_tb):
    """Without the connection limit of `conv` (wrk reconnects faster than closes complete)."""
    m = MiMBox(mode="convert")
    m.start(paper_tb, SERVER_PORT)
    yield m
    m.stop()


def tfo_passive(tb) -> int:
    out = tb.mbox.cmd("nstat -az TcpExtTCPFastOpenPassive")
    return int(out.split("TcpExtTCPFastOpenPassive")[1].split()[0])


def test_syn_data_carries_message_and_application_bytes(paper_tb, conv):
    """The SYN carries the Convert message and the application's first bytes (TFO, no cookie): the
    server gets those bytes first, the client gets the converter's answer before the server's."""
    srv = paper_tb.server.popen([PY, "-c", (
        "import socket;ls=socket.socket();ls.setsockopt(1,2,1);ls.bind(('0.0.0.0',%d));ls.listen();"
        "c,_=ls.accept();d=c.recv(100);c.sendall(b'server:'+d);c.close()" % SERVER_PORT)])
    try:
        from experiments.systems import wait_port
        wait_port(paper_tb.server, SERVER_PORT)
        before = tfo_passive(paper_tb)
        r = probe(paper_tb, conv.port, rfc8803.connect_message(paper_tb.server_ip, SERVER_PORT) + b"hello",
                  read_after=len(b"server:hello"))
    finally:
        srv.kill()
        srv.wait()
    assert r["sent_in_syn"] == 24 + 5, r
    assert r["error"] is None and bytes.fromhex(r["after"]) == b"server:hello", r
    reply = rfc8803.parse_reply(bytes.fromhex(r["reply"]))     # success: the server's SYN-ACK options in it
    assert reply.error is None and reply.length == len(bytes.fromhex(r["reply"])) and reply.server_options[:1] == b"\x02"
    assert tfo_passive(paper_tb) - before == 1, "the SYN's data was not accepted as such"


@pytest.mark.parametrize("name,message,code", [
    ("version 2", bytes([2, 6, 0, 0]) + rfc8803.connect_message("10.0.101.1", SERVER_PORT)[4:], Error.UNSUPPORTED_VERSION),
    ("zero length", bytes([1, 0, 0, 0]), Error.MALFORMED_MESSAGE),
    ("Connect cut", bytes([1, 2, 0, 0, 10, 1, 0x23, 0x28]), Error.MALFORMED_MESSAGE),
    ("unknown TLV", bytes([1, 2, 0, 0, 77, 1, 0, 0]), Error.UNSUPPORTED_MESSAGE),
    ("loopback", rfc8803.connect_message("127.0.0.1", 22), Error.NOT_AUTHORIZED),
    ("the converter itself", rfc8803.connect_message("10.0.1.2", 7800), Error.NOT_AUTHORIZED),
    ("nobody listens", rfc8803.connect_message("10.0.101.1", CLOSED_PORT), Error.CONNECTION_RESET),
    ("no route", rfc8803.connect_message("10.0.101.99", SERVER_PORT), Error.DESTINATION_UNREACHABLE),
    ("TCP option asked", rfc8803.connect_message("10.0.101.1", SERVER_PORT, tcp_options=bytes([2, 4, 5, 0xB4])),
     Error.UNSUPPORTED_TCP_OPTION),
])
def test_each_error_on_the_wire(paper_tb, conv, name, message, code):
    """Each refusal is an Error TLV with the RFC's code at the start of the stream, then its end."""
    before = sum(conv.stats()["refused"].values())
    r = probe(paper_tb, conv.port, message)
    assert r["error"] == code, (name, r)
    assert r["end"] in ("eof", "open"), r
    assert sum(conv.stats()["refused"].values()) - before == 1, (name, conv.stats()["refused"])


def test_resource_exceeded_at_the_connection_limit(paper_tb, conv):
    """--max-connections 4: four held connections, the fifth is told Resource Exceeded."""
    srv = Server(paper_tb, SERVER_PORT, mptcp=False, count=4)
    held = paper_tb.client.popen(["env", "MIMBOX_CONVERT_VIA=%s:%d" % (paper_tb.mbox_client_ip, conv.port),
                                  "LD_PRELOAD=" + str(conv_shim()), PY, "-c", (
        "import socket,time,struct;ss=[socket.create_connection(('%s',%d)) for _ in range(4)];"
        "[s.sendall(struct.pack('!4sQHxxI',b'MBX1',0,0,1)) for s in ss];[s.recv(1) for s in ss];"
        "print('held',flush=True);time.sleep(20)" % (paper_tb.server_ip, SERVER_PORT))],
        stdout=subprocess.PIPE, text=True)
    try:
        assert readline(held).strip() == "held"
        r = probe(paper_tb, conv.port, rfc8803.connect_message(paper_tb.server_ip, SERVER_PORT))
    finally:
        held.kill()
        held.wait()
        srv.kill()
    assert r["error"] == Error.RESOURCE_EXCEEDED, r


def conv_shim():
    from mimbox.paths import CONVERTIZE
    return CONVERTIZE


def test_destination_unreachable_after_connect_timeout(paper_tb, conv):
    """A server that never answers: after --connect-timeout (1 s) the client is told Destination
    Unreachable."""
    paper_tb.server.cmd(f"iptables -I INPUT -p tcp --dport {BLACKHOLE_PORT} -j DROP")
    try:
        r = probe(paper_tb, conv.port, rfc8803.connect_message(paper_tb.server_ip, BLACKHOLE_PORT))
    finally:
        paper_tb.server.cmd(f"iptables -D INPUT -p tcp --dport {BLACKHOLE_PORT} -j DROP")
    assert r["error"] == Error.DESTINATION_UNREACHABLE, r


def test_info_gets_supported_extensions(paper_tb, conv):
    r = probe(paper_tb, conv.port, rfc8803.info_message())
    assert r["error"] is None and bytes.fromhex(r["supported"]) == rfc8803.SUPPORTED_KINDS, r


def test_cookie_required(paper_tb):
    """--convert-cookie: no Cookie TLV is Missing Cookie, a wrong one Not Authorized, the right one served."""
    m = MiMBox(mode="convert", workers=1, extra=["--convert-cookie", "s3cret"])
    m.start(paper_tb, SERVER_PORT)
    try:
        missing = probe(paper_tb, m.port, rfc8803.connect_message(paper_tb.server_ip, SERVER_PORT))
        wrong = probe(paper_tb, m.port, rfc8803.connect_message(paper_tb.server_ip, SERVER_PORT, cookie=b"guess"))
        srv = Server(paper_tb, SERVER_PORT, mptcp=False)
        try:
            good = probe(paper_tb, m.port, rfc8803.connect_message(paper_tb.server_ip, SERVER_PORT, cookie=b"s3cret")
                         + bytes.fromhex("4d42583100000000000000000000000000000001"), read_after=1)
        finally:
            srv.kill()
    finally:
        m.stop()
    assert missing["error"] == Error.MISSING_COOKIE, missing
    assert wrong["error"] == Error.NOT_AUTHORIZED, wrong
    assert good["error"] is None and bytes.fromhex(good["after"]) == b"K", good


def test_fuzzed_messages_over_the_wire_never_stop_the_converter(paper_tb, conv):
    """300 mutated Convert messages through real SYNs: each complete one is answered (an Error, or a
    connection), one that claims more bytes than it has is waited for (RFC: the message is
    incomplete), the converter stays up and still serves a real client byte-exact afterwards."""
    good = rfc8803.connect_message(paper_tb.server_ip, CLOSED_PORT)      # nobody there: errors only
    rng = random.Random(8803)
    messages, waits = [], []
    for _ in range(300):
        m = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            m[rng.randrange(len(m))] = rng.randrange(256)
        try:
            incomplete = rfc8803.parse(bytes(m)) is None     # claims more bytes than it has
        except rfc8803.ConvertError:
            incomplete = False
        messages.append(bytes(m).hex())
        waits.append(incomplete)
    # a complete message waits 10 s for its answer: a SYN the kernel retransmits 3 times arrives after 7;
    # one still unanswered is reported with its TCP state and retransmissions, to tell who was waiting
    script = ["import socket,json,struct",
              f"msgs={messages!r};waits={waits!r};out=[]",
              "for m,w in zip(msgs,waits):",
              "    s=socket.socket(2,1,262);s.settimeout(0.5 if w else 10)",
              f"    s.sendto(bytes.fromhex(m),0x20000000,('{paper_tb.mbox_client_ip}',{conv.port}))",
              "    try:",
              "        out.append(len(s.recv(1024)))",
              "    except OSError as e:",
              "        i=s.getsockopt(6,11,104)",
              "        out.append(repr(e) if w else '%r state=%d retransmits=%d total_retrans=%d unacked=%d'",
              "                   % (e,i[0],i[2],struct.unpack_from('I',i,100)[0],struct.unpack_from('I',i,24)[0]))",
              "    s.close()",
              "print(json.dumps(out))"]
    path = f"/tmp/mimbox-fuzz-{os.getpid()}.py"
    with open(path, "w") as f:
        f.write("\n".join(script))
    try:
        out = paper_tb.client.cmd(f"{PY} {path}")
    finally:
        os.unlink(path)
    answers = json.loads(out.strip().splitlines()[-1])
    assert len(answers) == 300 and conv.procs[0].poll() is None
    complete = [a for w, a in zip(waits, answers) if not w]
    waiting = [a for w, a in zip(waits, answers) if w]
    unanswered = [(i, a, messages[i]) for i, (w, a) in enumerate(zip(waits, answers))
                  if not w and not (isinstance(a, int) and a > 0)]
    assert not unanswered, unanswered                                            # each one answered
    assert all(a == "TimeoutError('timed out')" for a in waiting), waiting       # waited for the rest
    assert len(complete) > 200, len(complete)         # an answer to (almost) every one
    transfer(paper_tb, conv, up=100_000, down=100_000)
    import ledger
    ledger.add(inputs=300)


@pytest.mark.parametrize("tool", ["curl", "wrk", "iperf3"])
def test_unchanged_programs_through_convert_client(paper_tb, conv_open, tool):
    """Our client shim with our converter: curl, wrk and iperf3, unchanged, over MPTCP."""
    from experiments import servers
    if tool == "iperf3":
        srv = servers.iperf3(paper_tb, IPERF_PORT)
        argv = ["iperf3", "-c", paper_tb.server_ip, "-p", str(IPERF_PORT), "-t", "1", "-J"]
    else:
        srv = servers.nginx(paper_tb, [1024], WEB_PORT)
        argv = (["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{size_download}",
                 f"http://{paper_tb.server_ip}:{WEB_PORT}/1024.bin"] if tool == "curl" else
                ["wrk", "-t", "1", "-c", "4", "-d", "1s", "-H", "Connection: close",
                 f"http://{paper_tb.server_ip}:{WEB_PORT}/1024.bin"])
    try:
        before = conv_open.stats()["accepted"]
        out = paper_tb.client.cmd(shlex.join(conv_open.client_argv(paper_tb, argv, mptcp=True)))
        accepted = conv_open.stats()["accepted"] - before
    finally:
        srv.stop()
    if tool == "curl":
        assert out.strip() == "200 1024", out
    elif tool == "wrk":
        assert "Socket errors" not in out and "requests in" in out, out
    else:
        report = json.loads(out[out.index("{"):])
        assert report["end"]["sum_received"]["bytes"] > 0, out[-500:]
    assert accepted >= 1, (accepted, out[-500:])


def test_message_after_the_handshake_without_fastopen(paper_tb, conv_open):
    """`--no-fastopen`: the SYN carries no data (the kernel's TFO counter does not move) and the
    Convert message leads the first bytes; a 256 KB download still arrives whole."""
    from experiments import servers
    srv = servers.nginx(paper_tb, [262144], BIG_WEB_PORT)
    try:
        before = tfo_passive(paper_tb)
        argv = [PY, "-m", "mimbox.ops.cli", "client", "--convert", "--no-fastopen", "--mptcp", "--via",
                f"{paper_tb.mbox_client_ip}:{conv_open.port}", "--", "curl", "-sS", "-o", "/dev/null", "-w",
                "%{http_code} %{size_download}", f"http://{paper_tb.server_ip}:{BIG_WEB_PORT}/262144.bin"]
        out = paper_tb.client.cmd(shlex.join(argv))
        after = tfo_passive(paper_tb)
    finally:
        srv.stop()
    assert out.strip().endswith("200 262144"), out
    assert after == before, "the SYN carried data"


def test_answer_waits_for_the_clients_handshake(paper_tb, conv):
    """Linux 6.18 never sends bytes written to an MPTCP socket accepted at its TFO SYN before the
    client's ACK completed the handshake. The client's ACK is held back (dropped on the client) until
    the converter has the server's answer: the answer must still reach the client once the handshake
    completes (the kernel retransmits its SYN-ACK after 1 s, the client ACKs). Before the converter
    waited for the handshake, this client waited forever (about 1 request in 5,000 at 800/s here)."""
    import time
    srv = Server(paper_tb, SERVER_PORT, mptcp=False)
    hold = f"OUTPUT -p tcp --dport {conv.port} ! --syn -j DROP"
    paper_tb.client.cmd(f"iptables -I {hold}")
    held = True
    try:
        p = paper_tb.client.popen([PY, PROBE, paper_tb.mbox_client_ip, str(conv.port),
                                   (rfc8803.connect_message(paper_tb.server_ip, SERVER_PORT)
                                    + bytes.fromhex("4d42583100000000000000000000000000000001")).hex(),
                                   "--mptcp", "--read-after-reply", "1"], stdout=subprocess.PIPE, text=True)
        def queued() -> bool:        # the server has answered (its byte and FIN are at the converter)
            rows = paper_tb.mbox.cmd(f"ss -Htna '( sport = :{conv.port} or dport = :{SERVER_PORT} )'")
            return any(r.split()[0] == "CLOSE-WAIT" or int(r.split()[1]) or int(r.split()[2])
                       for r in rows.splitlines() if r.strip() and r.split()[0] != "LISTEN")
        try:
            wait_until(queued, 3, "the server's answer queued at the converter")
        except AssertionError:
            pass                     # the check below says what the converter did
        state = paper_tb.mbox.cmd(f"ss -Htn state syn-recv '( sport = :{conv.port} )'")
        paper_tb.client.cmd(f"iptables -D {hold}")
        held = False
        out, _ = p.communicate(timeout=15)
    finally:
        if held:
            paper_tb.client.cmd(f"iptables -D {hold}")
        srv.kill()
    r = json.loads(out.strip().splitlines()[-1])
    assert state.strip(), "the client's handshake was not held back (test set-up)"
    assert r["error"] is None and bytes.fromhex(r["after"]) == b"K", (r, state, conv.log()[-1500:])
