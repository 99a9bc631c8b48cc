"""README's results section, generated from results/ (no number in it is typed by hand).

    python -m experiments.report        rewrites the part of README.md between the markers
"""
from __future__ import annotations

import json
import re

import pandas as pd

from experiments.common import RESULTS, ROOT

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str):
    d = RESULTS / name
    if not (d / "data.csv").exists():
        return None, None
    return pd.read_csv(d / "data.csv"), json.loads((d / "manifest.json").read_text())


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def _env_line(man: dict) -> str:
    e = man["environment"]
    p = man["params"]
    return (f"_Run {e['date']} on Linux {e['kernel']}, {e['cores']} cores ({e['cpu']}), commit {e['mimbox_commit']}; "
            f"parameters: {json.dumps(p)}._")


def fig4() -> str:
    df, man = _load("fig4_goodput")
    if df is None:
        return "_Fig. 4 not run yet._"
    if "offload" not in df:
        df = df.assign(offload=False)
    g = df.groupby(["offload", "mss", "system"]).agg(goodput=("goodput_gbps", "mean"),
                                                     cpu=("cpu_s_per_gb", "mean")).reset_index()
    rows = []
    for (offload, mss), d in g.groupby(["offload", "mss"]):
        d = d.set_index("system")
        row = {"MSS": f"{mss}{' TSO/GSO on' if offload else ''}"}
        for s in d.index:
            row[f"{s} Gbit/s"] = f"{d.goodput[s]:.2f}"
        mb = d.goodput.get("mimbox")
        for peer in ("router", "haproxy-1t", "read/write", "splice"):
            if peer in d.index and mb:
                row[f"mimbox/{peer}"] = f"{mb / d.goodput[peer]:.2f}"
        row["CPU s/GB mimbox / haproxy / r/w"] = " / ".join(
            f"{d.cpu.get(s, float('nan')):.2f}" for s in ("mimbox", "haproxy-1t", "read/write"))
        rows.append(row)
    return ("![Fig. 4](results/fig4_goodput/figure.png)\n\n" + _md(pd.DataFrame(rows)) + "\n\n" + _env_line(man))


def table1() -> str:
    d = RESULTS / "table1_delay" / "table.csv"
    if not d.exists():
        return "_Table 1 not run yet._"
    _, man = _load("table1_delay")
    return ("![Table 1](results/table1_delay/figure.png)\n\n" + _md(pd.read_csv(d).fillna("—")) + "\n\n"
            + _env_line(man))


def fig5() -> str:
    df, man = _load("fig5_workload")
    if df is None:
        return "_Fig. 5 not run yet._"
    g = df.groupby(["size", "system"]).agg(rps=("req_per_s", "mean"), cpu=("cpu_us_per_req", "mean"),
                                           errors=("socket_errors", "sum")).reset_index()
    rows = []
    for size in sorted(g["size"].unique()):
        d = g[g["size"] == size].set_index("system")
        row = {"size": f"{size // 1024} KB"}
        for s in d.index:
            row[s] = f"{d.rps[s]:.0f}"
        pairs = [("mimbox", p) for p in ("haproxy-1t", "squid", "router")]
        pairs += [(m, "haproxy-" + m.split("-")[1].replace("w", "t")) for m in d.index
                  if m.startswith("mimbox-") and m.endswith("w")]     # same number of event loops
        for mine, peer in pairs:
            if mine in d.index and peer in d.index:
                row[f"{mine}/{peer}"] = f"{d.rps[mine] / d.rps[peer]:.2f}"
        row["µs CPU/req mimbox / haproxy-1t"] = f"{d.cpu.get('mimbox', float('nan')):.0f} / " \
                                                 f"{d.cpu.get('haproxy-1t', float('nan')):.0f}"
        rows.append(row)
    paper = "Paper at 1 KB (8-core testbed): MiMBox 22k, HAProxy 8 threads 18k, 1 thread 9.5k, Squid 2.5k req/s " \
            "(MiMBox/HAProxy-1t 2.3, MiMBox/Squid 8.8)."
    return ("![Fig. 5](results/fig5_workload/figure.png)\n\n" + _md(pd.DataFrame(rows)) + "\n\n" + paper + "\n\n"
            + _env_line(man))


def fig6() -> str:
    df, man = _load("fig6_buffers")
    if df is None:
        return "_Fig. 6 not run yet._"
    f = man.get("findings", {})
    rows = []
    for direction in ("download", "upload"):
        x = f.get(direction, {})
        size = x.get("smallest_buffer_95pct")
        conv = df[(df.direction == direction) & (df.system == "mimbox")].groupby("buffer").goodput_mbps.mean()
        best = f"not reached (best {conv.max():.2f} Mbit/s at {int(conv.idxmax()) // 1024} KB)" if len(conv) else "—"
        rows.append({"direction": direction, "direct Mbit/s": f"{x.get('direct_mbps', float('nan')):.2f}",
                     "smallest buffer with ≥95 % of direct": f"{size // 1024} KB" if size else best,
                     "connections in 8 GB": x.get("connections_in_8GB") or "—",
                     "paper": "200 KB, 20,000 connections" if direction == "download" else "—"})
    s = f.get("download_small_server_side")
    extra = ""
    if s:
        extra = (f"\n\nSmaller server-facing buffer (download): client side {s['client_side'] // 1024} KB, server side "
                 f"{s['server_side'] // 1024} KB → {s['goodput_mbps']:.2f} Mbit/s, {s['memory_per_connection'] // 1024} KB "
                 f"per connection ({100 * s['saved_vs_symmetric']:.0f} % less), {s['connections_in_8GB']} "
                 f"connections in 8 GB.")
    return ("![Fig. 6](results/fig6_buffers/figure.png)\n\n" + _md(pd.DataFrame(rows)) + extra + "\n\n"
            + _env_line(man))


def interactive() -> str:
    df, man = _load("interactive_delay")
    if df is None:
        return "_Interactive delay not run yet._"
    g = df.groupby(["loss_side", "system"])[["mean_ms", "p99_ms", "max_ms"]].mean().round(1).reset_index()
    g.columns = ["1 % loss on", "system", "mean ms", "p99 ms", "max ms"]
    return ("![Interactive](results/interactive_delay/figure.png)\n\n" + _md(g) +
            "\n\nPaper (client-side loss, 200 KB buffers): max ~150 ms with MiMBox, ~250 ms without.\n\n"
            + _env_line(man))


def profile() -> str:
    df, man = _load("profile_converter")
    if df is None:
        return "_Profile not run yet._"
    f, m = man.get("findings", {}), man
    top = df.head(8)[["code", "function", "kind", "share"]].assign(share=lambda d: (100 * d.share).round(1))
    top.columns = ["line", "function", "kind", "% of busy samples"]
    cpu = sum(m.get("cpu_us_per_request", [])) / max(1, len(m.get("cpu_us_per_request", [])))
    return ("![Profile](results/profile_converter/figure.png)\n\n"
            f"Under Fig. 5's 1 KB load the converter spent {100 * f.get('system_call_share', 0):.0f} % of its busy "
            f"samples in system calls and {100 * f.get('python_share', 0):.0f} % interpreting Python "
            f"({cpu:.0f} µs CPU per request, {m.get('samples', 0)} samples).\n\n" + _md(top) + "\n\n" + _env_line(man))


def reliability() -> str:
    path = RESULTS / "reliability" / "summary.json"
    if not path.exists():
        return "_Run `./mimbox.sh reliability` to fill this table._"
    r = json.loads(path.read_text())
    t = r.get("tests", {})
    row = {"cases run": r.get("cases", 0), "bytes compared": f"{r.get('bytes_compared', 0):,}",
           "faults injected": r.get("faults", 0), "inputs fuzzed": f"{r.get('inputs', 0):,}",
           "tests passed": t.get("passed", 0), "failed": t.get("failed", 0) + t.get("error", 0),
           "skipped": t.get("skipped", 0), "seed": r.get("seed")}
    return _md(pd.DataFrame([row]))


def section() -> str:
    parts = [("Fig. 4 — goodput vs MSS", fig4()), ("Table 1 — forwarding delay", table1()),
             ("Fig. 5 — requests/s vs file size", fig5()), ("Fig. 6 — goodput vs per-socket memory", fig6()),
             ("Interactive delay", interactive()), ("Where the converter's time goes", profile()),
             ("Reliability suite", reliability())]
    return "\n\n".join(f"### {title}\n\n{body}" for title, body in parts)


def update_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = f"{START}\n<!-- generated by `python -m experiments.report` from results/: do not edit -->\n\n" \
          f"{section()}\n\n{END}"
    text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    readme.write_text(text)


if __name__ == "__main__":
    update_readme()
