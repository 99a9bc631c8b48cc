"""Hold many idle connections open (load/resource tests).

    server: python hold.py server PORT N        accept N connections, keep them until stdin closes
    client: python hold.py client HOST PORT N   open N connections, print 'held K', keep until stdin closes
"""
import resource
import socket
import sys

from mimbox.mptcp import IPPROTO_MPTCP


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
    sys.stdin.read()
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
