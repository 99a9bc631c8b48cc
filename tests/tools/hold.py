"""Hold many idle connections open (load/resource tests).

    server: python hold.py server PORT N        accept N connections, keep them until stdin closes
                                                (echoing what each sends)
    client: python hold.py client HOST PORT N   open N connections, print 'held K refused R', keep until
                                                stdin closes; each line `echo` on stdin: 64 bytes of its own
                                                through every held connection, printed 'echoed OK of K'
"""
import resource
import selectors
import socket
import sys
import threading

from mimbox.wire.mptcp import IPPROTO_MPTCP


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(hard, 200_000), max(hard, 200_000)))
    except (ValueError, OSError):   # no CAP_SYS_RESOURCE: up to the hard limit only
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    role = sys.argv[1]
    socks = []
    if role == "server":
        port, n = int(sys.argv[2]), int(sys.argv[3])
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        ls.listen(65535)
        print("ready", flush=True)
        while len(socks) < n:
            socks.append(ls.accept()[0])
        print(f"accepted {len(socks)}", flush=True)
        threading.Thread(target=echo, args=(socks,), daemon=True).start()
    else:
        host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        refused = 0
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
            try:
                s.connect((host, port))
                socks.append(s)
            except OSError:
                refused += 1
                s.close()
        print(f"held {len(socks)} refused {refused}", flush=True)
        for line in sys.stdin:
            if line.strip() == "echo":
                print(f"echoed {sum(echoed(i, s) for i, s in enumerate(socks))} of {len(socks)}", flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()


def echo(socks: list) -> None:
    """Send back what each connection sends (the server's side of `echo`)."""
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            data = key.fileobj.recv(65536)
            if not data:
                sel.unregister(key.fileobj)
                continue
            key.fileobj.sendall(data)


def echoed(i: int, s: socket.socket) -> bool:
    """64 bytes of connection i's own there and back, byte-exact."""
    payload = (f"{i:08d}" * 8).encode()
    s.settimeout(10)
    s.sendall(payload)
    got = b""
    while len(got) < len(payload):
        chunk = s.recv(len(payload) - len(got))
        if not chunk:
            break
        got += chunk
    return got == payload


if __name__ == "__main__":
    main()
