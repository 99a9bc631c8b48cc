"""Send SYNs carrying data from an address that is not the sender's (scapy), as an attacker on the
client's link would: the converter's SYN-ACK goes to a host that does not exist.

    python spoof.py SRC DST DPORT HEX [--repeat N]

Three kinds per repeat: a TFO option with a made-up cookie, a TFO cookie request (empty option),
and no TFO option at all; each SYN carries the bytes HEX. Prints one JSON line: SYNs sent."""
import argparse
import json
import random

from scapy.all import IP, TCP, Raw, conf, send

conf.verb = 0
ap = argparse.ArgumentParser()
ap.add_argument("src")
ap.add_argument("dst")
ap.add_argument("dport", type=int)
ap.add_argument("hex")
ap.add_argument("--repeat", type=int, default=3)
a = ap.parse_args()
data = bytes.fromhex(a.hex)
rng = random.Random(20)
sent = 0
for _ in range(a.repeat):
    for tfo in ((34, bytes(rng.randrange(256) for _ in range(8))), (34, b""), None):
        opts = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7)] + ([tfo] if tfo else [])
        send(IP(src=a.src, dst=a.dst) / TCP(sport=rng.randrange(20000, 60000), dport=a.dport, flags="S",
                                            seq=rng.randrange(1 << 32), options=opts) / Raw(data))
        sent += 1
print(json.dumps({"sent": sent}), flush=True)
