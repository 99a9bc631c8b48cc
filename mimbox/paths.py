"""Where the native parts live (the core, the LD_PRELOAD shims, the BPF objects): MIMBOX_BUILD if
set; else mimbox/_native/ inside an installed package (the wheel builds them there: setup.py); else
build/ of the checkout this package runs from (`./mimbox.sh build`)."""
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
ROOT = PACKAGE.parent


def _build_dir() -> Path:
    if os.environ.get("MIMBOX_BUILD"):
        return Path(os.environ["MIMBOX_BUILD"])
    if (PACKAGE / "_native" / "librelaycore.so").exists():
        return PACKAGE / "_native"
    return ROOT / "build"


BUILD = _build_dir()
BPF_CLIENT_OBJ = BUILD / "bpf" / "dstopt_client.bpf.o"
BPF_SERVER_OBJ = BUILD / "bpf" / "dstopt_server.bpf.o"
MPTCPIZE = BUILD / "libmptcpize.so"
CONVERTIZE = BUILD / "libconvertize.so"
RELAYCORE = BUILD / "librelaycore.so"
