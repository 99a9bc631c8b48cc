"""A victim's SYN, then a forged SYN from the same (address, port) naming another destination
(scapy, the client's own address; the caller keeps its kernel from resetting what it does not know).

    python forge_dstopt.py SRC DST DPORT FIRST_ADDR:PORT FORGED_ADDR:PORT SPORT

Prints one JSON line: whether the victim's SYN got a SYN-ACK, what the forged SYN got back (flags),
and, after the victim's handshake is completed with an ACK, nothing more (the server side says where
it went)."""
import argparse
import json
import sys

from scapy.all import IP, TCP, conf, send, sr1

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from mimbox.wire.dstopt import DstOpt  # noqa: E402

conf.verb = 0
ap = argparse.ArgumentParser()
for name in ("src", "dst"):
    ap.add_argument(name)
ap.add_argument("dport", type=int)
ap.add_argument("first")
ap.add_argument("forged")
ap.add_argument("sport", type=int)
a = ap.parse_args()


def option(where: str):
    host, port = where.rsplit(":", 1)
    raw = DstOpt(host, int(port)).encode()
    return (raw[0], raw[2:])


def syn(where: str, seq: int):
    return IP(src=a.src, dst=a.dst) / TCP(sport=a.sport, dport=a.dport, flags="S", seq=seq,
                                          options=[("MSS", 1460), option(where)])


out = {}
synack = sr1(syn(a.first, 1000), timeout=5)
out["victim"] = str(synack[TCP].flags) if synack is not None else None
forged = sr1(syn(a.forged, 777000), timeout=5)
out["forged"] = str(forged[TCP].flags) if forged is not None else None
if synack is not None:
    send(IP(src=a.src, dst=a.dst) / TCP(sport=a.sport, dport=a.dport, flags="A", seq=1001,
                                        ack=synack[TCP].seq + 1))
print(json.dumps(out), flush=True)
