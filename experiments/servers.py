"""The servers of the experiments, on tb.server: nginx (HTTP objects) and iperf3 (bulk)."""
from __future__ import annotations

import os
import signal
import subprocess

from experiments.systems import mptcp_everywhere, wait_port


class Server:
    """A process on the server host; MPTCP (shim) when the experiment's baseline needs it."""

    def __init__(self, tb, argv: list[str], port: int, mptcp: bool, cpus: str | None = None):
        if mptcp:
            argv = mptcp_everywhere(argv, tb.server)
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]
        self.port = port
        self.proc = tb.server.popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_port(tb.server, port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def nginx(tb, sizes: list[int], port: int = 80, mptcp: bool = False, cpus: str | None = None,
          ipv6: bool = False) -> Server:
    """nginx serving /<size>.bin files of each size (lighter than the paper's Apache, so the server
    is not the bottleneck); ipv6: on [::] too."""
    host = tb.server
    d = host.mkdtemp("nginx")
    www = f"{d}/www"
    host.run(f"mkdir -m 755 {www}")
    for n in sizes:
        host.write_file(f"{www}/{n}.bin", os.urandom(n))
    cfg = f"{d}/nginx.conf"
    v6 = f"listen [::]:{port} ipv6only=on backlog=4096 reuseport; " if ipv6 else ""
    host.write_file(cfg, f"""daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 65536; multi_accept on; }}
http {{ access_log off; sendfile on; tcp_nopush off; tcp_nodelay on; keepalive_timeout 0; client_body_temp_path {d};
  proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{ listen {port} backlog=4096 reuseport; {v6}root {www}; }} }}
""")
    return Server(tb, ["nginx", "-c", cfg, "-p", d], port, mptcp, cpus)


def iperf3(tb, port: int = 5201, mptcp: bool = False, cpus: str | None = None) -> Server:
    """An iperf3 server (MPTCP through the shim when asked)."""
    return Server(tb, ["iperf3", "-s", "-p", str(port)], port, mptcp, cpus)
