"""A converter of your own in the comparison, as a System subclass (for more than a command line:
start-up checks, several processes, a config file, its own client wrapper):

    ./mimbox.sh compare --systems router,mimbox,my-socat \
        --system my-socat=@experiments/examples/my_converter.py:SocatMptcp --sizes 1K --reps 3

What a System does (experiments/systems/__init__.py): start(tb, server_port) starts its processes
on the converter host tb.mbox with self._popen (pinned to `cpus`, inside its CPU box, stderr in its
log), listening on self.port; endpoint() says where the client connects; client_argv() wraps the
client command (by default: the client's sockets made MPTCP); stop() is inherited (SIGTERM, then
SIGKILL). `converts = True` puts it in a CPU box of its own and checks that it converts.
"""
from __future__ import annotations

from experiments.systems import System, mptcp_listeners, wait_port
from topologies.support import ALLOCATE


class SocatMptcp(System):
    """socat as an MPTCP <-> TCP converter: its listening socket made MPTCP by MiMBox's shim in
    listen-only mode (the connections it opens to the server stay TCP), a process per connection."""
    converts = True

    def __init__(self, name: str = "socat-mptcp", cpus: str | None = None):
        super().__init__(cpus)
        self.name, self.port = name, ALLOCATE.port()

    def start(self, tb, server_port: int) -> None:
        super().start(tb, server_port)
        self._popen(tb.mbox, mptcp_listeners(["socat", f"TCP-LISTEN:{self.port},fork,reuseaddr,backlog=512",
                                              f"TCP:{tb.server_ip}:{server_port}"]))
        wait_port(tb.mbox, self.port)
