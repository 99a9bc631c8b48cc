"""Where the artefacts built by `invoke build` live (BPF objects, the MPTCP shim)."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = Path(os.environ.get("MIMBOX_BUILD", ROOT / "build"))
BPF_CLIENT_OBJ = BUILD / "bpf" / "dstopt_client.bpf.o"
BPF_SERVER_OBJ = BUILD / "bpf" / "dstopt_server.bpf.o"
MPTCPIZE = BUILD / "libmptcpize.so"
CONVERTIZE = BUILD / "libconvertize.so"
RELAYCORE = BUILD / "librelaycore.so"
