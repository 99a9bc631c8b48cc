"""docs/results.md and README's headline table, generated from results/ (no number in them is typed
by hand).

    python -m experiments.report        rewrites the generated parts (between the markers)
"""
from __future__ import annotations

import json
import re

import pandas as pd

from experiments.common import CONVERTER_QUOTA_CORES, RESULTS, ROOT
from topologies.regimes import END_HOST_BOUND

START, END = "<!-- results:start -->", "<!-- results:end -->"


def _load(name: str):
    d = RESULTS / name
    if not (d / "data.csv").exists():
        return None, None
    return pd.read_csv(d / "data.csv"), json.loads((d / "manifest.json").read_text())


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.astype(object).iterrows():   # keeps each column's own type (no ints as floats)
        lines.append("| " + " | ".join("—" if isinstance(r[c], float) and r[c] != r[c] else str(r[c])
                                       for c in cols) + " |")
    return "\n".join(lines)


MODULES = {"fig5_workload": "workload", "percost_converter": "percost", "fig4_goodput": "goodput",
           "table1_delay": "delay", "table1_breakdown": "breakdown", "fig6_buffers": "buffers",
           "interactive_delay": "interactive", "profile_converter": "profile", "scaleout": "scaleout",
           "tfo_stall": "tfostall", "fig5_families": "families",
           "uring_engine": "uring", "concurrency": "concurrency"}


def _mode(man: dict) -> str:
    """'full mode', 'quick mode' or 'custom parameters': the run's parameters against its module's."""
    import importlib
    name = MODULES.get(man.get("experiment", ""))
    if name is None:
        return "custom parameters"
    mod = importlib.import_module(f"experiments.{name}")
    same = lambda a, b: json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)  # noqa: E731
    return "full mode" if same(man["params"], mod.FULL) else "quick mode" if same(man["params"], mod.QUICK) \
        else "custom parameters"


def _env_line(man: dict) -> str:
    e = man["environment"]
    p = man["params"]
    steal = man.get("cpu_steal_share")
    flagged = ("\n\n**This run is flagged** (its rows are in data.csv, the failing ones included): "
               + "; ".join(man["problems"]) + "." if man.get("problems") else "")
    return (f"_Run {e['date']} on Linux {e['kernel']}, {e['cores']} cores ({e['cpu']}), commit {e['mimbox_commit']}; "
            + (f"host's CPU steal {steal:.0%}; " if steal is not None else "")
            + f"{_mode(man)}: {json.dumps(p)}" + _calibration(man) + "._" + flagged)


def _calibration(man: dict) -> str:
    """'; quota calibrated to X core per loop (router R x the best probed converter)' for runs with
    quota_cores "auto" (the regime is under 'regime' or per regime under 'regimes')."""
    regimes = [man.get("regime") or {}, *(man.get("regimes") or {}).values()]
    cal = next((r["calibration"] for r in regimes if isinstance(r, dict) and "calibration" in r), None)
    if not cal:
        return ""
    return (f"; quota calibrated on this machine to {cal['cores_per_loop']:g} core per loop (router "
            f"{cal['probes'][-1]['router_over_best']:.2f}x the best probed converter)")


REGIME_MEANING = {
    "converter-bound": "every converter held to the same CPU quota per event loop (the paper's regime: the "
                       "converter box is the bottleneck, so rates follow the converter's CPU per request)",
    "end-host-bound": "no quota: the end hosts' core caps every system, so equal rates mean \"not the bottleneck\", "
                      "not \"equally fast\"",
}


def _regimes(df: pd.DataFrame) -> list[str]:
    present = set(df["regime"]) if "regime" in df else {"end-host-bound"}
    return [r for r in ("converter-bound", "end-host-bound") if r in present]


def _quota_line(man: dict) -> str:
    q = man.get("regimes", {}).get("converter-bound", {})
    if not q.get("quota_us_per_loop"):
        return ""
    return (f"Quota: {q['quota_us_per_loop']} µs per {q['period_us']} µs period per event loop "
            f"({q['cores_per_loop']:g} core, cgroup {q['cgroup']}).")


def _bound_line(man: dict, key: str, unit: str) -> str:
    checks = man.get("findings", {}).get("bound_check", [])
    if not checks:
        return ""
    several = len({c.get("loops", 1) for c in checks}) > 1       # a run with N-loop systems: each count apart
    parts = [f"{c[key] // 1024 if key == 'size' else c[key]}{unit}"
             + (f" {c.get('loops', 1)} loop{'s' if c.get('loops', 1) > 1 else ''}" if several else "")
             + f": {c['router_over_best']:.1f}×" + ("" if c["converter_bound"] else " (not converter-bound)")
             for c in checks]
    return "Router over the best converter (≥ 2× means the converters were the bottleneck): " + ", ".join(parts) + "."


def fig4() -> str:
    df, man = _load("fig4_goodput")
    if df is None:
        return "_Fig. 4 not run yet._"
    if "offload" not in df:
        df = df.assign(offload=False)
    if "regime" not in df:
        df = df.assign(regime="end-host-bound")
    out = ["![Fig. 4](results/fig4_goodput/figure.png)"]
    for regime in _regimes(df):
        g = df[df.regime == regime].groupby(["offload", "mss", "system"]).agg(
            goodput=("goodput_gbps", "mean"), cpu=("cpu_s_per_gb", "mean")).reset_index()
        rows = []
        for (offload, mss), d in g.groupby(["offload", "mss"]):
            d = d.set_index("system")
            row = {"MSS": f"{mss}{' TSO/GSO on' if offload else ''}"}
            for sname in d.index:
                row[f"{sname} Gbit/s"] = f"{d.goodput[sname]:.2f}"
            mb = d.goodput.get("mimbox")
            for peer in ("router", "haproxy-1t-tcp", "read/write", "splice"):
                if peer in d.index and mb:
                    row[f"mimbox/{peer}"] = f"{mb / d.goodput[peer]:.2f}"
            row["CPU s/GB mimbox / haproxy / r/w / splice"] = " / ".join(
                f"{d.cpu.get(x, float('nan')):.2f}" for x in ("mimbox", "haproxy-1t-tcp", "read/write", "splice"))
            rows.append(row)
        out.append(f"**{regime}** — {REGIME_MEANING[regime]}.\n\n" + _md(pd.DataFrame(rows)))
        if regime == "converter-bound":
            out.append(" ".join(x for x in (_quota_line(man), _bound_line(man, "mss", " B")) if x))
    out.append(_env_line(man))
    return "\n\n".join(out)


def table1() -> str:
    d = RESULTS / "table1_delay" / "table.csv"
    if not d.exists():
        return "_Table 1 not run yet._"
    _, man = _load("table1_delay")
    return ("![Table 1](results/table1_delay/figure.png)\n\n" + _md(pd.read_csv(d).fillna("—")) + "\n\n"
            + _env_line(man))


FIG5_PEERS = ("haproxy-1t", "haproxy-1t-tcp", "haproxy-1t-mptcp-server", "squid", "splice", "read/write", "router")


def breakdown() -> str:
    path = RESULTS / "table1_breakdown" / "phases.csv"
    if not path.exists():
        return "_Breakdown not run yet._"
    _, man = _load("table1_breakdown")
    t = pd.read_csv(path)
    rows = []
    for (idle, system, seg), g in t.groupby(["idle", "system", "segment"], sort=False):
        parts = [f"{r.phase} {r.us:.0f}" for r in g.itertuples() if r.phase != "total"]
        total = g[g.phase == "total"].us
        rows.append({"idle": idle, "system": system, "segment": seg, "phases (median µs)": " → ".join(parts),
                     "total": f"{total.iloc[0]:.0f}" if len(total) else "—"})
    spares = RESULTS / "table1_breakdown" / "spares.csv"
    made = ""
    if spares.exists():
        made = "MiMBox's held SYNs that found no spare server socket (socket() on their path): " + ", ".join(
            f"{r.idle} {r.socket_on_path} of {r.syns}" for r in pd.read_csv(spares).itertuples()) + ". "
    return ("![Breakdown](results/table1_breakdown/figure.png)\n\n" + _md(pd.DataFrame(rows)) + "\n\n" + made +
            "Measured with bpftrace on the converter's system calls and tcpdump on its two interfaces "
            "(`experiments/breakdown.py`); tracing every system call of the process slows it, so the phases "
            "add up to more than Table 1's untraced totals.\n\n" + _env_line(man))


def fig5() -> str:
    df, man = _load("fig5_workload")
    if df is None:
        return "_Fig. 5 not run yet._"
    if "regime" not in df:
        df = df.assign(regime="end-host-bound")
    out = ["![Fig. 5](results/fig5_workload/figure.png)"]
    for regime in _regimes(df):
        sub = df[df.regime == regime]
        g = sub.groupby(["size", "system"], sort=False).agg(rps=("req_per_s", "mean"), cpu=("cpu_us_per_req", "mean"),
                                                            errors=("socket_errors", "sum")).reset_index()
        systems = list(dict.fromkeys(sub.system))
        rows = []
        for name in systems:
            row = {"system": name}
            for size in sorted(g["size"].unique()):
                d = g[(g["size"] == size) & (g.system == name)]
                if len(d):
                    row[f"{size // 1024} KB req/s"] = f"{d.rps.iloc[0]:.0f}"
            d1 = g[(g["size"] == g["size"].min()) & (g.system == name)]
            row[f"µs CPU/req at {g['size'].min() // 1024} KB"] = "—" if not len(d1) or pd.isna(d1.cpu.iloc[0]) \
                else f"{d1.cpu.iloc[0]:.0f}"
            rows.append(row)
        ratios = []
        for size in sorted(g["size"].unique()):
            d = g[g["size"] == size].set_index("system")
            pairs = [("mimbox", p) for p in FIG5_PEERS] + [("mimbox-convert", "mimbox")]   # RFC 8803 vs DST_OPT
            pairs += [(m, "haproxy-" + m.split("-")[1].replace("w", "t")) for m in d.index
                      if m.startswith("mimbox-") and m.endswith("w")]     # same number of event loops
            ratios += [f"{size // 1024} KB {mine}/{peer} **{d.rps[mine] / d.rps[peer]:.2f}**"
                       for mine, peer in pairs if mine in d.index and peer in d.index]
        out.append(f"**{regime}** — {REGIME_MEANING[regime]}.\n\n" + _md(pd.DataFrame(rows)) + "\n\nreq/s ratios: "
                   + "; ".join(ratios) + ".")
        if "haproxy-1t-mptcp-server" in systems:
            out.append("haproxy-1t-mptcp-server: HAProxy-1t with *every* socket MPTCP (the shim's default, "
                       "`mptcpize`'s way), so its connections to the server are MPTCP sockets fallen back to "
                       "TCP; every other converter, HAProxy-1t included, speaks TCP to the server.")
        if regime == "converter-bound":
            out.append(" ".join(x for x in (_quota_line(man), _bound_line(man, "size", " KB")) if x))
            out.append(_per_rep_line(sub))
    from experiments.workload import PAPER_1KB as P
    out.append(f"Paper at 1 KB (8-core testbed, converter box saturated): MiMBox {P['mimbox'] / 1000:g}k, HAProxy 8 "
               f"threads {P['haproxy-8t'] / 1000:g}k, 1 thread {P['haproxy-1t'] / 1000:g}k, Squid {P['squid'] / 1000:g}k "
               f"req/s (MiMBox/HAProxy-1t {P['mimbox'] / P['haproxy-1t']:.1f}, MiMBox/Squid {P['mimbox'] / P['squid']:.1f}).")
    out.append(_env_line(man))
    return "\n\n".join(out)


def _per_rep_line(sub: pd.DataFrame) -> str:
    """The headline ratios repetition by repetition at the smallest size (same rep = same machine state):
    a mean above 1 says little if one repetition is below it."""
    size = sub["size"].min()
    d = sub[sub["size"] == size].pivot_table(index="rep", columns="system", values="req_per_s")
    parts = []
    for mine, peer in (("mimbox", "haproxy-1t"), ("mimbox", "haproxy-1t-tcp"), ("mimbox-2w", "haproxy-2t")):
        if mine in d and peer in d:
            r = (d[mine] / d[peer]).dropna()
            parts.append(f"{mine}/{peer} " + ", ".join(f"{v:.2f}" for v in r) + f" (lowest {r.min():.2f})")
    return f"Per repetition at {size // 1024} KB: " + "; ".join(parts) + "." if parts else ""


def _rates(name: str):
    """An experiment's summary.csv of req/s and µs CPU per request (rounded) and its manifest; None if not run."""
    path = RESULTS / name / "summary.csv"
    if not path.exists():
        return None, None
    _, man = _load(name)
    t = pd.read_csv(path)
    return t.assign(req_per_s=t.req_per_s.round(0).astype(int), cpu_us_per_req=t.cpu_us_per_req.round(0)), man


def percost() -> str:
    t, man = _rates("percost_converter")
    if t is None:
        return "_Per-connection cost not run yet._"
    t.columns = ["system", "req/s", "µs CPU/req", "req/s vs haproxy-1t", "CPU vs haproxy-1t"]
    paths = man.get("syn_paths", {})
    held = "; ".join(f"{k} {v['syns']} for {v['accepted']} connections" for k, v in paths.items())
    from experiments.percost import cpu_split_table
    split = cpu_split_table(man)
    split_md = ("Where the converter's CPU per request runs (µs, `perf record` on its processes during one more "
                "run of the same load):\n\n" + _md(split.fillna(0)) + "\n\n") if len(split) else ""
    from experiments.percost import work_table
    work = work_table(man)
    work_md = ("What each converter asks of the kernel per request (`strace -c -f` on its processes and `nstat` "
               "in its namespace, one more run of the same load; strace slows it, so counts only):\n\n"
               + _md(work) + "\n\n") if len(work) else ""
    return ("![Per-connection cost](results/percost_converter/figure.png)\n\n" + _md(t.astype(object).fillna("—")) + "\n\n"
            + (f"SYNs that visited the converter (NFQUEUE): {held}.\n\n" if held else "")
            + split_md + work_md + _env_line(man))


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
    out = "![Interactive](results/interactive_delay/figure.png)\n\n" + _md(g)
    rec = [c for c in ("over_200ms", "phone_sender_rto", "phone_sender_tlp", "phone_sender_fast_retrans",
                       "phone_sender_mptcp_reinjected", "server_rto", "phone_rto") if c in df]
    if rec:
        r = df.groupby(["loss_side", "system"])[rec].mean().round(1).reset_index()
        r.columns = ["1 % loss on", "system"] + [{
            "over_200ms": "messages > 200 ms", "phone_sender_rto": "RTOs (sender to phone)",
            "phone_sender_tlp": "loss probes (sender to phone)", "phone_sender_fast_retrans": "fast retransmits",
            "phone_sender_mptcp_reinjected": "MPTCP reinjections", "server_rto": "RTOs (server)",
            "phone_rto": "RTOs (phone)"}[c] for c in rec]
        out += ("\n\nHow the losses were recovered, per run (the sender to the phone is the converter with "
                "MiMBox, the server without):\n\n" + _md(r))
    return (out + "\n\nPaper (client-side loss, 200 KB buffers): max ~150 ms with MiMBox, ~250 ms without.\n\n"
            + _env_line(man))


def profile() -> str:
    df, man = _load("profile_converter")
    if df is None or "area" not in df:
        return "_Profile not run yet._"
    from experiments.profile import BULK, SMALL, UNIT, table, workloads
    text = {SMALL: "Converter CPU per 1 KB request under Fig. 5's converter-bound load, by where perf found it "
                   "(the converter's own code; the kernel by area). Same run, alternating systems.",
            BULK: "Converter CPU per GB of a bulk upload (Fig. 4's MSS 1460 point, TSO/GSO on, converter-bound), "
                  "by area: what a converter does per byte."}
    out = ["![Profile](results/profile_converter/figure.png)"]
    from experiments.profile import kernel_table
    for w in workloads(df):
        t = table(df, w).reset_index().rename(columns={"area": "where (perf)"})
        cols = [c for c in t.columns if c != "where (perf)"]
        t.columns = ["where (perf)"] + [f"{c} {UNIT[w]}" for c in cols]
        out += [text[w], _md(t)]
        k = kernel_table(df, w)
        if not k.empty:
            out += [f"The kernel side by side ({UNIT[w]}, `results/profile_converter/kernel_{w}.csv`): each kernel "
                    "function's cost per system and each one's difference to HAProxy's, sorted by MiMBox's "
                    "difference; the rest summed.", _md(k.fillna(""))]
    return "\n\n".join(out) + "\n\n" + _env_line(man)


def families() -> str:
    df, man = _load("fig5_families")
    if df is None:
        return "_Not run yet: `python -m experiments.families`._"
    t = pd.read_csv(RESULTS / "fig5_families" / "summary.csv")
    t["req_per_s"] = t["req_per_s"].round(0).astype(int)
    t["cpu_us_per_req"] = t["cpu_us_per_req"].round(1)
    t = t.rename(columns={"vs_haproxy_1t_median": "vs haproxy-1t (median of reps)",
                          "ipv6_over_ipv4_median": "IPv6 / IPv4 (median of reps)"})
    return ("![Families](results/fig5_families/figure.png)\n\nFig. 5's converter-bound 1 KB point with client, "
            "converter and server all IPv4, then all IPv6, interleaved in one run; the client's TCP timestamps "
            "are off for every row (DST_OPT's IPv6 form needs the room).\n\n" + _md(t) + "\n\n" + _env_line(man))


def uring() -> str:
    df, man = _load("uring_engine")
    if df is None:
        return "_Not run yet: `python -m experiments.uring`._"
    d = RESULTS / "uring_engine"
    s, r = pd.read_csv(d / "summary.csv"), pd.read_csv(d / "ratios.csv")
    return ("![io_uring](results/uring_engine/figure.png)\n\nMiMBox on the io_uring engine (`--engine uring`: "
            "recv/send with provided buffers, the loop waiting on a restricted ring) against the epoll core, "
            "at Fig. 5's converter-bound 1 KB point and at Fig. 4's TSO bulk point, interleaved, the same CPU "
            "quota for all; ratios per repetition.\n\n" + _md(s) + "\n\n" + _md(r) + "\n\n" + _env_line(man))


def scaleout() -> str:
    df, man = _load("scaleout")
    if df is None:
        return "_Scale-out not run yet._"
    f = man.get("findings", {})
    conv = df[df["instances"] > 0]
    g = conv.groupby("instances").agg(req_s=("req_per_s", "mean"), cpu=("cpu_us_per_req", "mean"),
                                      joins=("joins", "sum"), lost=("joins_no_token", "sum"),
                                      rejected=("joins_rejected", "sum"), busiest=("busiest_share", "mean"))
    eff = f.get("efficiency", {})
    t = pd.DataFrame({"converters": g.index.astype(int), "req/s": g.req_s.round(0).astype(int),
                      "ideal N × (N=1)": (g.index * g.req_s.get(1, float("nan"))).round(0).astype(int),
                      "efficiency": [eff.get(str(int(n)), "—") for n in g.index],
                      "µs CPU/req": g.cpu.round(0).astype(int), "joins": g.joins.astype(int),
                      "joins without token": g.lost.astype(int), "joins refused by the kernel": g.rejected.astype(int),
                      "busiest converter's share": g.busiest.round(2)})
    q = man.get("regime", {})
    cores = man.get("params", {}).get("quota_cores")
    if cores:     # a converter below its quota is not what bounds the rate
        t["quota used"] = (g.req_s * g.cpu / (g.index * cores * 1e6)).round(2).values
    router = f.get("router_req_per_s", 0)
    top = g.req_s.iloc[-1]
    return ("![Scale-out](results/scaleout/figure.png)\n\n" + _md(t) + "\n\n"
            f"No converter (the phone speaking MPTCP to the server through the front router): {router:.0f} req/s. "
            f"That is the end hosts' ceiling here — wrk, nginx and the front router's forwarding share one core — "
            f"and {len(g)} converters reach {100 * top / router:.0f} % of it; where the converters use less than "
            "their quota (\"quota used\" < 1) they are not what bounds the rate: through converters each request "
            "also costs the end hosts more (an MPTCP connection to the converter, a TCP one from it), so on this "
            "2-core machine the end hosts, not the converters, bound any further N. Joins without token: MP_JOINs that met a converter that "
            "does not own their connection (0 with the C flag and the announced address); joins refused by the "
            "kernel: joins that met their own converter but a connection not yet fully established or already "
            "closing (1 KB requests close within a round trip). "
            + (f"Quota {q.get('quota_us_per_loop')} µs per {q.get('period_us')} µs per converter. " if q else "")
            + "\n\n" + _env_line(man))


def tfostall() -> str:
    df, man = _load("tfo_stall")
    if df is None:
        return "_Not run yet._"
    from experiments.tfostall import STALL_MS
    g = df.groupby(["client", "server", "syn_data", "size"])["ms"]
    med = g.median().round(1).astype(str) + " (" + g.apply(lambda v: int((v > STALL_MS).sum())).astype(str) \
        + "/" + g.size().astype(str) + ")"
    t = med.unstack("size").reset_index()
    t.insert(0, "case", [f"{r.client} → {r.server} listener, {'SYN data' if r.syn_data else 'data after handshake'}"
                         for r in t.itertuples()])
    t = t.drop(columns=["client", "server", "syn_data"])
    t.columns = [f"median ms (downloads over {STALL_MS} ms)"] + [f"{c // 1024} KB" for c in t.columns[1:]]
    f = man.get("findings", {})
    first = f.get("smallest_stalled_size")
    return ("Download times on loopback in a namespace of their own, no converter: the kernel alone. "
            + (f"An MPTCP connection to an MPTCP listener whose SYN carried data waits for about one "
               f"retransmission timeout in the median download from {first // 1024} KB on; TCP on either side "
               "does not, and the same bytes sent after the handshake only sometimes do (MPTCP on loopback "
               "has occasional stalls of its own). Hence `mimbox client --convert --no-fastopen`, and Fig. 5's "
               "convert row stops at 64 KB." if first else "No stall on this kernel.")
            + "\n\n" + _md(t) + "\n\n" + _env_line(man))


def hardening() -> str:
    t, man = _rates("hardening")
    if t is None:
        return "_Run `python -m experiments.hardening` to fill this table._"
    t = t[["system", "req_per_s", "cpu_us_per_req", "socket_errors", "req_per_s_vs_haproxy_1t"]]
    t.columns = ["system", "req/s", "µs CPU/req", "socket errors", "req/s vs haproxy-1t"]
    r = pd.read_csv(RESULTS / "hardening" / "ratios.csv")
    g = r.groupby("pair", sort=False).agg(mean=("req_per_s", "mean"), lo=("req_per_s", "min"), hi=("req_per_s", "max"),
                                          cpu=("cpu_us_per_req", "mean"))
    pairs = "; ".join(f"{p}: req/s {x['mean']:.2f}x (reps {x.lo:.2f}-{x.hi:.2f}), CPU/req {x.cpu:.2f}x"
                      for p, x in g.iterrows())
    return ("What the hardening costs at Fig. 5's converter-bound point (1 KB, 40 clients, a new connection per "
            "request; the earlier build exported from git and run beside this one, interleaved): RFC 8803 mode "
            "requiring the TFO cookie and capping clients that wait for their message, and explicit mode as the "
            "unprivileged `mimbox` user under seccomp, against `--user root` and the earlier build.\n\n"
            + _md(t) + f"\n\nSame-run ratios: {pairs}.\n\n" + _env_line(man))


def reliability() -> str:
    path = RESULTS / "reliability" / "summary.json"
    if not path.exists():
        return "_Run `./mimbox.sh reliability` to fill this table._"
    r = json.loads(path.read_text())
    t = r.get("tests", {})
    row = {"bytes compared (counted by the transfer helper)": f"{r.get('bytes_compared', 0):,}",
           "faults injected": f"{r.get('faults', 0):,}", "inputs fuzzed": f"{r.get('inputs', 0):,}",
           "tests passed": t.get("passed", 0), "failed": t.get("failed", 0) + t.get("error", 0),
           "skipped": t.get("skipped", 0), "seed": r.get("seed")}
    text = _md(pd.DataFrame([row]))
    kinds = r.get("faults_by_kind")
    if kinds:
        text += ("\n\nFaults, counted where they were injected and seen to take effect (tests/faults.py): "
                 + ", ".join(f"{k} {v:,}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + ".")
    f = r.get("measurements", {}).get("syn_flood")
    if f:
        d, c = f["direct"], f["converter"]
        text += (f"\n\nSpoofed SYN flood ({f['flood_syn_per_s']:,} SYN/s for {f['seconds']} s from the client's own "
                 f"/24) beside a real client of 1 KB echo requests: directly to the server {d['done']}/"
                 f"{d['done'] + d['failed']} requests ({d['rate']:.0f}/s, p99 {d['latency_ms_p99']} ms); through the "
                 f"converter {c['done']}/{c['done'] + c['failed']} ({c['rate']:.0f}/s, p99 {c['latency_ms_p99']} ms). "
                 f"The server saw {f['server_flood_connections']} connections caused by the flood (pending cap "
                 f"{f['pending_cap']}); the converter's fds went {f['converter_fds']['baseline']} → "
                 f"{f['converter_fds']['peak']} → {f['converter_fds']['after']}, its RSS "
                 f"{f['converter_rss_kb']['baseline'] // 1024} → {f['converter_rss_kb']['peak'] // 1024} MB; "
                 f"{f['log_lines']} log lines; {f['syns_seen']} SYNs visited it, {f['deferred']} of them released "
                 f"unheld.")
    h = r.get("measurements", {}).get("hostile")
    if h:
        text += ("\n\nHostile clients (tests/test_hostile.py; each case failed before its fix):\n\n"
                 + _md(pd.DataFrame(h)))
    x = r.get("measurements", {}).get("converter failure behind ECMP")
    if x:
        how = ("every one by a reset: its keeper outlived the crash (\"Crashes\" above)" if x["reset"] == x["cut"]
               else f"{x['reset']} by a reset, the others by an early end of stream")
        text += (f"\n\nA converter of 3 behind the ECMP address crashed (SIGKILL) in the middle of {x['connections']} "
                 f"transfers: {x['on the dead converter']} of them were on it; {x['cut']} ended with it ({how}) "
                 f"and {x['on the dead converter'] - x['cut']} had been handed to its kernel whole and completed; all {x['survivors complete']} others completed "
                 f"byte-exact; the front router's health check dropped it {x['route withdrawn (ms)']} ms after the "
                 f"kill, and {x['new connections to survivors']} new connections all went to the survivors.")
    return text


def concurrency() -> str:
    df, man = _load("concurrency")
    if df is None:
        return "_Cost against concurrency not run yet._"
    from experiments.concurrency import attributable
    att = attributable(df)
    t = pd.DataFrame({"regime": att["regime"], "system": att["system"], "N": att["connections"].astype(int),
                      "KB/conn beside the router": att["attributable_kb_per_conn"].round(2),
                      "RSS KB/conn": att["rss_kb_per_conn"].round(2),
                      "socket buffers KB/conn": att["sockmem_kb_per_conn"].round(2),
                      "idle CPU %": att["idle_cpu_pct"].round(2),
                      "µs CPU/keep-alive": att["cpu_us_per_keepalive"].round(0),
                      "µs CPU/new request": att["cpu_us_per_new"].round(0),
                      "keep-alive p50/p99/p99.9 ms": [f"{a:.2f} / {b:.2f} / {c:.2f}" for a, b, c in zip(
                          att["keepalive_p50_ms"], att["keepalive_p99_ms"], att["keepalive_p99.9_ms"])],
                      "new request p99 ms": att["new_p99_ms"].round(2),
                      "MPTCP fallbacks": att["mptcp_fallbacks"].astype(int)})
    stopped = man.get("findings", {}).get("stopped", {})
    caches = pd.DataFrame(man.get("caches", []))
    cache_md = ""
    if len(caches):
        if "regime" in caches:        # the end-host-bound pass's (the converter-bound one's are the same sockets)
            caches = caches[caches.regime == END_HOST_BOUND].drop(columns="regime")
        top = caches.groupby(["system", "connections"]).sum(numeric_only=True).reset_index()
        router = top[top.system == "router"].set_index("connections")
        conv = top[top.system != "router"].copy()
        cols = [c for c in caches.columns if c not in ("system", "connections")]
        for c in cols:
            conv[c] = [round((r[c] - router[c].get(r["connections"], float("nan"))) / 1024, 2) for _, r in conv.iterrows()]
        keep = [c for c in cols if conv[c].abs().max() >= 0.05]
        cache_md = ("\n\nKernel caches per connection beside the router's (KB, slab deltas at rest, end-host-bound):\n\n"
                    + _md(conv[["system", "connections", *keep]].sort_values(["connections", "system"])))
    return ("![Concurrency](results/concurrency/figure.png)\n\n" + _md(t.sort_values(["regime", "N", "system"],
                                                                                       ascending=[False, True, True]))
            + cache_md + "\n\n"
            + ("Not run: " + "; ".join(f"{k}: {v}" for k, v in stopped.items()) + ". " if stopped else "")
            + f"Converter-bound: each system's event loops held to {CONVERTER_QUOTA_CORES} of a core each. "
            + "Memory beside the router: the kernel caches' growth per connection with the system (active "
              "objects x size), minus the router's at the same N (the phone speaking MPTCP end to end to an MPTCP "
              "echo server), plus the system's RSS and socket buffers. MPTCP fallbacks: client connections that "
              "fell back to TCP for want of an MPTCP token — the kernel's token table is one for every namespace "
              "of this VM (phones', converter's, server's), and fills towards 100,000 connections; on separate "
              "machines each host has its own. "
            + _env_line(man))


def section() -> str:
    parts = [("Fig. 5 — requests/s vs file size", fig5()),
             ("Per-connection cost, converter-bound, 1 KB", percost()),
             ("Fig. 4 — goodput vs MSS", fig4()), ("Table 1 — forwarding delay", table1()),
             ("Where Table 1's microseconds go", breakdown()),
             ("Fig. 6 — goodput vs per-socket memory", fig6()),
             ("Interactive delay", interactive()), ("Where the converter's time goes", profile()),
             ("Fig. 5's 1 KB point in both IP families", families()),
             ("The io_uring engine against the epoll core", uring()),
             ("Scale-out: N converters behind one ECMP address", scaleout()),
             ("Cost against concurrency: mostly idle phones", concurrency()),
             ("RFC 8803 on this kernel: MPTCP with SYN data", tfostall()),
             ("What the hardening costs", hardening()),
             ("Measured steps: each change against the build before it", steps()),
             ("Reliability suite", reliability())]
    return "\n\n".join(f"### {title}\n\n{body}" for title, body in parts)


HEAD_START, HEAD_END = "<!-- headline:start -->", "<!-- headline:end -->"


def headline() -> str:
    """README's few numbers: the converter-bound 1 KB point of Fig. 5 and the per-connection run,
    each system against HAProxy-1t, from results/ (the whole story: docs/results.md)."""
    rows = []
    df, _ = _load("fig5_workload")
    if df is not None:
        cb = df[(df.regime == "converter-bound") & (df["size"] == 1024)].groupby("system").req_per_s.mean()
        if "haproxy-1t" in cb:
            for name in ("mimbox", "haproxy-1t", "squid", "read/write", "splice"):
                if name in cb:
                    rows.append(("Fig. 5, 1 KB, converter-bound", name, f"{cb[name]:,.0f}", f"{cb[name] / cb['haproxy-1t']:.2f}"))
    pc, _ = _load("percost_converter")
    if pc is not None:
        m = pc.groupby("system").agg(rps=("req_per_s", "mean"), us=("cpu_us_per_req", "mean"))
        if "haproxy-1t" in m.index and "mimbox" in m.index:
            for name in [n for n in ("mimbox", "mimbox-uring", "haproxy-1t") if n in m.index]:
                rows.append(("per-connection run, 1 KB", name, f"{m.rps[name]:,.0f} ({m.us[name]:.0f} µs CPU/req)",
                             f"{m.rps[name] / m.rps['haproxy-1t']:.2f}"))
    fam, _ = _load("fig5_families")
    if fam is not None:
        m = fam[fam.family == "IPv6"].groupby("system").req_per_s.mean()
        m4 = fam[fam.family == "IPv4"].groupby("system").req_per_s.mean()
        for name in ("mimbox", "haproxy-1t"):
            rows.append((f"Fig. 5 point over IPv6, no TCP timestamps (IPv4 same run: {m4[name] / m4['haproxy-1t']:.2f})",
                         name, f"{m[name]:,.0f}", f"{m[name] / m['haproxy-1t']:.2f}"))
    ur, _ = _load("uring_engine")
    if ur is not None:
        m = ur[ur.workload == "1KB"].groupby("system").agg(rps=("rate", "mean"), us=("cost", "mean"))
        if {"mimbox", "mimbox-uring", "haproxy-1t"} <= set(m.index):
            for name in ("mimbox-uring", "mimbox", "haproxy-1t"):
                rows.append(("io_uring engine A/B, 1 KB, converter-bound", name,
                             f"{m.rps[name]:,.0f} ({m.us[name]:.0f} µs CPU/req)", f"{m.rps[name] / m.rps['haproxy-1t']:.2f}"))
    if not rows:
        return "_No results yet: `./mimbox.sh reproduce --quick`._"
    return (_md(pd.DataFrame(rows, columns=["run", "system", "requests/s", "vs haproxy-1t"])) + concurrency_headline()
            + kernel_headline())


def concurrency_headline() -> str:
    """One sentence from results/concurrency: the most connections MiMBox held, what each cost it,
    and MiMBox beside HAProxy-1t at the largest N both held."""
    df, _ = _load("concurrency")
    if df is None or "kernel_kb_per_conn" not in df:
        return ""
    from experiments.concurrency import attributable
    att = attributable(df)
    att = att[att.regime == END_HOST_BOUND]
    mim = att[att.system.str.startswith("mimbox")]
    if mim.empty:
        return ""
    top = mim.sort_values(["connections", "attributable_kb_per_conn"]).iloc[-1]
    text = (f"\n\nConcurrency (mostly idle MPTCP phones, `results/concurrency`): {top.system} held "
            f"{int(top.connections):,} connections at {top.attributable_kb_per_conn:.1f} KB each beside the router "
            f"(kernel caches, RSS, buffers), {top.idle_cpu_pct:.2f} % of a core idle, keep-alive p99 "
            f"{top.keepalive_p99_ms:.1f} ms")
    both = att[att.system.isin(["mimbox-1w", "haproxy-1t-tcp"])].pivot_table(
        index="connections", columns="system", values="attributable_kb_per_conn")
    both = both.dropna()
    if len(both):
        n = both.index.max()
        m, h = both.loc[n, "mimbox-1w"], both.loc[n, "haproxy-1t-tcp"]
        text += f"; at {int(n):,}: mimbox-1w {m:.1f} KB, haproxy-1t (tcp) {h:.1f} KB ({m / h:.2f}x)"
        # like for like only if both held the same sockets per connection (client subflows + server)
        per = {s: r.sockets_in_converter_ns / r.connections for r in att[att.connections == n].itertuples()
               for s in [r.system] if s in ("mimbox-1w", "haproxy-1t-tcp") and r.connections}
        if len(per) == 2 and abs(per["mimbox-1w"] - per["haproxy-1t-tcp"]) >= 0.5:
            text += (f", not like for like: {per['mimbox-1w']:.1f} vs {per['haproxy-1t-tcp']:.1f} sockets per "
                     "connection (the clients' second subflows)")
    return text + "."


def kernel_headline(top: int = 5) -> str:
    """README's kernel side by side: kernel µs per 1 KB request, MiMBox (Fig. 5's) against HAProxy-1t,
    in total and for the functions where MiMBox spends the most more (results/profile_converter)."""
    df, _ = _load("profile_converter")
    if df is None or "symbol" not in df:
        return ""
    from experiments.profile import SMALL, kernel_table
    k = kernel_table(df, SMALL, top=top)
    if k.empty or "mimbox" not in k or "haproxy-1t" not in k:
        return ""
    k = k[["kernel function", "mimbox", *(["mimbox-static-accept"] if "mimbox-static-accept" in k else []),
           "haproxy-1t", "mimbox - haproxy-1t"]]
    k = pd.concat([k.tail(1), k.head(top)]).rename(columns={"kernel function": "kernel µs per 1 KB request (perf)"})
    return "\n\n" + _md(k)


def steps() -> str:
    """One row per `experiments.abtest --label STEP` run (results/abtest/STEP/): the change against
    the build before it, interleaved in one run at Fig. 5's converter-bound 1 KB point."""
    from experiments.common import mean_ci
    rows = []
    for d in sorted((RESULTS / "abtest").glob("*/ratios.csv")) if (RESULTS / "abtest").is_dir() else []:
        man = json.loads((d.parent / "manifest.json").read_text())
        r, g = pd.read_csv(d), pd.read_csv(d.parent / "summary.csv").set_index("system")
        now = next(x for x in g.index if x.startswith("mimbox") and "@" not in x)
        before = next(x for x in g.index if "@" in x)
        m, ci = mean_ci(r.req_per_s)
        rows.append({"step": d.parent.name, "against": before.split("@")[1], "reps x s": f"{man['params']['reps']} x {man['params']['seconds']}",
                     "req/s": f"{g.req_per_s[now]:,.0f} vs {g.req_per_s[before]:,.0f}",
                     "µs CPU/req": f"{g.cpu_us_per_req[now]:.1f} vs {g.cpu_us_per_req[before]:.1f}",
                     "per-rep req/s ratio": f"{m:.3f} ± {ci:.3f} (median {r.req_per_s.median():.3f})"})
    if not rows:
        return "_No step measured yet: `python -m experiments.abtest --before COMMIT --label STEP`._"
    return ("Each row: `python -m experiments.abtest --before COMMIT --label STEP` (this build and the one "
            "before the change, HAProxy-1t beside them, interleaved; ratio: mean ± 95 % CI over repetitions). "
            "A step smaller than the CI is not resolved by this VM either way.\n\n" + _md(pd.DataFrame(rows)))


def _replace(path, start: str, end: str, body: str) -> None:
    text = path.read_text()
    new = f"{start}\n<!-- generated by `python -m experiments.report` from results/: do not edit -->\n\n{body}\n\n{end}"
    path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: new, text, flags=re.S))


def update_readme() -> None:
    """docs/results.md's generated part (every figure's tables) and README's headline table."""
    _replace(ROOT / "docs" / "results.md", START, END, section().replace("](results/", "](../results/"))
    _replace(ROOT / "README.md", HEAD_START, HEAD_END, headline())


if __name__ == "__main__":
    update_readme()
