"""Send raw bytes as a TCP Fast Open SYN's data to a converter and report what comes back.

    python convert_probe.py HOST PORT HEX [--mptcp] [--read-after-reply N] [--no-cookie]

The SYN carries the bytes only once this namespace holds the converter's TFO cookie (the first
connection to an address asks for it and sends its bytes after the handshake).

Prints one JSON line: the reply's bytes (hex, the first Convert message as the converter sent it),
its parsed error code (or null), what followed it (hex, up to N bytes) and how the stream ended."""
import argparse
import json
import socket
import sys

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0])
from mimbox.wire import rfc8803  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("host")
ap.add_argument("port", type=int)
ap.add_argument("hex")
ap.add_argument("--mptcp", action="store_true")
ap.add_argument("--read-after-reply", type=int, default=0)
ap.add_argument("--no-cookie", action="store_true", help="put the data in the SYN without the converter's TFO cookie")
a = ap.parse_args()
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262 if a.mptcp else 0)
if a.no_cookie:
    s.setsockopt(socket.IPPROTO_TCP, 34, 1)    # TCP_FASTOPEN_NO_COOKIE: data in the SYN without a cookie
# blocking: without the cookie the kernel completes the handshake, then sends the bytes
try:
    out = {"sent_in_syn": s.sendto(bytes.fromhex(a.hex), 0x20000000, (a.host, a.port))}
except OSError as e:
    print(json.dumps({"sent_in_syn": 0, "reply": "", "error": None, "supported": None, "after": "",
                      "end": f"connect: {e.strerror}"}), flush=True)
    sys.exit(0)
s.settimeout(5)
buf, end = b"", "open"
try:
    while True:
        r = rfc8803.parse_reply(buf) if len(buf) >= 4 else None
        if r is not None and len(buf) >= r.length + a.read_after_reply:
            break
        chunk = s.recv(65536)
        if not chunk:
            end = "eof"
            break
        buf += chunk
except ConnectionResetError:
    end = "reset"
except socket.timeout:
    end = "timeout"
except rfc8803.ConvertError as e:
    end = f"bad reply: {e}"
r = None
try:
    r = rfc8803.parse_reply(buf)
except rfc8803.ConvertError:
    pass
out.update(reply=buf[:r.length].hex() if r else buf.hex(), error=int(r.error) if r and r.error is not None else None,
           supported=r.supported.hex() if r and r.supported else None,
           after=buf[r.length:].hex() if r else "", end=end)
print(json.dumps(out), flush=True)
