"""A hostile client is a first-class case (issue "safe to expose"): spoofed SYNs, an idle crowd,
private destinations, forged DST_OPTs, and the converter's own privileges. Real namespaces, the
converter as `mimbox run` with its defaults but for what each test names."""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from conftest import PY, readline, transfer

from experiments.systems import MiMBox
from mimbox import convert

TOOLS = os.path.join(os.path.dirname(__file__), "tools")
SINK_PORT = 9400


class Sink:
    """A TCP server on the testbed's server host that counts every byte and connection it gets."""

    SCRIPT = ("import socket,select,json,sys,time\n"
              "ls=socket.socket();ls.setsockopt(1,2,1);ls.bind(('0.0.0.0',%d));ls.listen(512);ls.setblocking(0)\n"
              "print('listening',flush=True);conns=[];n=0;got=b''\n"
              "while True:\n"
              "  r,_,_=select.select([ls,sys.stdin]+conns,[],[],0.2)\n"
              "  if sys.stdin in r: break\n"
              "  for s in r:\n"
              "    if s is ls:\n"
              "      try: c,_=ls.accept();conns.append(c);n+=1\n"
              "      except BlockingIOError: pass\n"
              "    elif s is not sys.stdin:\n"
              "      d=s.recv(65536)\n"
              "      if d: got+=d;s.sendall(b'OK')\n"
              "      else: conns.remove(s);s.close()\n"
              "print(json.dumps({'connections':n,'bytes':len(got),'data':got[:200].decode('latin1')}),flush=True)\n")

    def __init__(self, tb, port: int = SINK_PORT):
        self.proc = tb.server.popen([PY, "-c", self.SCRIPT % port], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
        assert readline(self.proc).strip() == "listening"

    def report(self) -> dict:
        out, _ = self.proc.communicate("stop\n", timeout=10)
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def wait_for(cond, timeout: float, what: str, every: float = 0.05):
    """Wait until cond() is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(every)


def watch(read, window: float, changed, every: float = 0.05):
    """Read `read()` for `window` seconds (a negative needs a window: here, far longer than the
    microseconds the converter takes to act) and return the first reading for which changed() holds,
    else the last one."""
    deadline = time.monotonic() + window
    while True:
        r = read()
        if changed(r) or time.monotonic() > deadline:
            return r
        time.sleep(every)


def syn_recv(host, port: int, src: str) -> int:
    out = host.cmd(f"ss -Htn state syn-recv src :{port} dst {src}")
    return len([x for x in out.splitlines() if x.strip()])


def probe(tb, port: int, message: bytes, *extra: str) -> dict:
    out = tb.client.cmd(f"{PY} {TOOLS}/convert_probe.py {tb.mbox_client_ip} {port} {message.hex()} --mptcp "
                        + " ".join(extra))
    lines = [x for x in out.splitlines() if x.startswith("{")]
    assert lines, out
    return json.loads(lines[-1])


@pytest.fixture(scope="module")
def conv(paper_tb):
    m = MiMBox(mode="convert", workers=1)
    m.start(paper_tb, SINK_PORT)
    yield m
    m.stop()


def test_spoofed_syn_data_reaches_no_server(paper_tb, conv):
    """A SYN from an on-link address that does not exist, carrying a Convert message and a request
    (with a made-up TFO cookie, a cookie request, or no TFO option): the server sees 0 connections
    and 0 bytes, the converter opens no server connection. The same request from the real client
    (it gets the TFO cookie on its first connection; its next SYN carries the message) goes through."""
    request = convert.connect_message(paper_tb.server_ip, SINK_PORT) + b"GET /admin?delete=all HTTP/1.0\r\n\r\n"
    spoofed = "10.0.1.77"       # on the client's link, nobody there
    sink = Sink(paper_tb)
    try:
        before = conv.stats()
        out = paper_tb.client.cmd(f"{PY} {TOOLS}/spoof.py {spoofed} {paper_tb.mbox_client_ip} {conv.port} "
                                  f"{request.hex()} --repeat 3")
        assert json.loads(out.strip().splitlines()[-1])["sent"] == 9, out
        # every SYN reached the converter's kernel (each left a connection in SYN-RECV, answered by a
        # SYN-ACK nobody gets); taking SYN data would have made them accept()able right then
        wait_for(lambda: syn_recv(paper_tb.mbox, conv.port, spoofed) == 9, 5, "9 spoofed SYNs in SYN-RECV")
        after = watch(conv.stats, 1.0, lambda a: a["accepted"] != before["accepted"])
        spoof = sink.report()
    finally:
        sink.kill()
    assert spoof["connections"] == 0 and spoof["bytes"] == 0, spoof
    assert after["server_connects"] == before["server_connects"], after
    assert after.get("greetings", 0) == 0
    # the real client: a first connection gets the cookie, the second carries the message in its SYN
    sink = Sink(paper_tb)
    try:
        first = probe(paper_tb, conv.port, request, "--read-after-reply 2")
        second = probe(paper_tb, conv.port, request, "--read-after-reply 2")
        real = sink.report()
    finally:
        sink.kill()
    assert first["error"] is None and bytes.fromhex(first["after"]) == b"OK", first
    assert second["error"] is None and bytes.fromhex(second["after"]) == b"OK", second
    assert real["connections"] == 2 and real["data"].count("GET /admin") == 2, real
