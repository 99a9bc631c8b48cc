"""DST_OPT's room in a SYN, measured: how many of TCP's 40 option bytes Linux's own SYN options take
(TCP or MPTCP socket, timestamps on or off, IPv4 or IPv6), whether DST_OPT's IPv4 form (10 bytes)
and IPv6 form (22) fit, and what the kernel does when one does not (the SYN leaves without it).

    python -m experiments.dstopt_room

Each case runs a one-connection program under `mimbox client` (the real BPF programs) in the client
namespace of a topologies.netns.NamespaceLine and captures the SYN it sends at the converter's
interface (tcpdump), in the converter namespace where a plain listener answers. Nothing is
timed: each case is one SYN, repeated `reps` times to show it is deterministic.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from experiments.common import progress, run_experiment
from mimbox.wire import dstopt
from topologies.netns import NamespaceLine

NAME = "dstopt_room"
FULL = dict(reps=3, port=7911, dport=8080)
QUICK = dict(reps=1, port=7911, dport=8080)
ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
LISTEN = ("import socket\nls = socket.socket(socket.AF_INET6); ls.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
          "ls.bind(('::', {port})); ls.listen(64); print('ready', flush=True)\n"
          "while True: ls.accept()[0].close()\n")
CONNECT = "import socket, sys\ntry:\n    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()\nexcept OSError as e:\n    print(e)\n"


def syn_options(pcap: str) -> bytes:
    """The TCP options of the one SYN in `pcap`."""
    from scapy.all import TCP, rdpcap
    pkts = [p for p in rdpcap(pcap) if TCP in p]
    tcp = bytes(pkts[0][TCP])
    return tcp[20:(tcp[12] >> 4) * 4]


def one_case(line: NamespaceLine, params: dict, mptcp: bool, timestamps: bool, dst: str) -> dict:
    """One SYN of the case, captured; its option bytes split into the kernel's and DST_OPT's."""
    port = params["port"]
    line.sh(line.client_ns, f"sysctl -qw net.ipv4.tcp_timestamps={int(timestamps)}")
    with tempfile.TemporaryDirectory() as tmp:
        pcap = f"{tmp}/syn.pcap"
        cap = line.start(line.mb_ns, ["tcpdump", "-U", "-c", "1", "-w", pcap, "-i", line.mb_client_dev,
                                      f"tcp dst port {port}"],     # the first packet: the SYN
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while "listening on" not in (cap.stderr.readline() or "listening on"):
            pass
        via = ["--via", f"{line.MB_C4}:{port}", "--via", f"[{line.MB_C6}]:{port}"] + (["--mptcp"] if mptcp else [])
        out = line.run(line.client_ns, [PY, "-m", "mimbox.ops.cli", "client", *via, "--", PY, "-c", CONNECT, dst,
                                        str(params["dport"])], cwd=ROOT)
        cap.wait(timeout=10)
        opts = syn_options(pcap)
    parsed = dstopt.parse_options(opts)
    need = len(dstopt.DstOpt(dst, params["dport"]).encode())
    carried = parsed.dst is not None
    kernel = len(opts) - ((need + 3) // 4 * 4 if carried else 0)
    return dict(socket="mptcp" if mptcp else "tcp", timestamps=timestamps, destination="ipv6" if ":" in dst else "ipv4",
                syn_family="ipv6" if ":" in dst else "ipv4", kernel_option_bytes=kernel, room=40 - kernel,
                dstopt_bytes=need, fits=need <= 40 - kernel, carried=carried,
                client_said=(out.stderr.strip().splitlines() or [""])[-1][:160])


def run(params: dict) -> tuple[pd.DataFrame, dict]:
    rows = []
    with NamespaceLine("mimbox-room") as line:
        ready = line.start(line.mb_ns, [PY, "-c", LISTEN.format(port=params["port"])], stdout=subprocess.PIPE, text=True)
        assert ready.stdout.readline().strip() == "ready"
        for rep in range(params["reps"]):
            for mptcp in (False, True):
                for ts in (True, False):
                    for dst in (line.SERVER4, line.SERVER6):
                        progress(f"rep {rep}: {'mptcp' if mptcp else 'tcp'} timestamps={ts} to {dst}")
                        rows.append(dict(rep=rep, **one_case(line, params, mptcp, ts, dst)))
    return pd.DataFrame(rows), {}


def findings(df: pd.DataFrame) -> dict:
    """Per case: the kernel's bytes, the room, whether DST_OPT was carried (same in every rep?)."""
    g = df.groupby(["socket", "timestamps", "destination"])
    return {f"{s} ts={'on' if t else 'off'} {d}": dict(kernel_option_bytes=sorted(set(x.kernel_option_bytes)),
                                                       room=sorted(set(x.room)), dstopt_bytes=int(x.dstopt_bytes.iloc[0]),
                                                       carried=sorted(set(x.carried)))
            for (s, t, d), x in g}


def problems(df: pd.DataFrame) -> list[str]:
    """The run is valid when every case was the same in every rep and DST_OPT went where it fit."""
    out = []
    for key, x in df.groupby(["socket", "timestamps", "destination"]):
        if x.room.nunique() != 1 or x.carried.nunique() != 1:
            out.append(f"{key}: not the same in every rep")
        if bool(x.fits.iloc[0]) != bool(x.carried.iloc[0]):
            out.append(f"{key}: fits={x.fits.iloc[0]} but carried={x.carried.iloc[0]}")
    return out


def plot(df: pd.DataFrame):
    """Stacked bars per case: the kernel's option bytes, DST_OPT's (hatched when it did not fit)."""
    import matplotlib.pyplot as plt
    d = df[df.rep == 0]
    labels = [f"{r.socket}\nts {'on' if r.timestamps else 'off'}\n{r.destination}" for r in d.itertuples()]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    x = range(len(d))
    ax.bar(x, d.kernel_option_bytes, color="#888888", label="Linux's SYN options")
    ax.bar(x, d.dstopt_bytes, bottom=d.kernel_option_bytes, color=["#2a7" if c else "none" for c in d.carried],
           edgecolor=["#2a7" if c else "#c33" for c in d.carried],
           label="DST_OPT (empty, red: did not fit, the SYN left without it)")
    ax.axhline(40, color="black", lw=1)
    ax.text(len(d) - 0.5, 40.5, "40-byte limit", ha="right", va="bottom", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("option bytes in the SYN")
    ax.set_ylim(0, 50)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    df = run_experiment(sys.modules[__name__], a.quick, {})
    print(df.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
