"""The same figure points on this machine (Mininet) and over SSH on the rig (topologies/sshrig.py):
what the remote harness measures beside what the embedded one does, ratios side by side.

    ./mimbox.sh remote-example            # or: python -m experiments.remote_example [--quick]

Fig. 5 at its converter-bound 1 KB point (router, MiMBox static, HAProxy-1t tcp, the paper's
read()/write() converter; each environment calibrates its own CPU quota) and Table 1's halt regime
(router, read/write, MiMBox with a TCP server), first locally, then on the rig, each through
experiments.common.run_experiment as `reproduce` runs them. Writes results/remote_example/:
local/ and rig/ (each figure's data, figure and manifest, as a figure run writes them),
ratios.csv (per environment and repetition: each converter's req/s over HAProxy-1t's and the
router's), delays.csv (Table 1's medians per environment) and summary.json (means, 95 % CIs,
whether the two environments agree within their spread).

On one machine the rig measures the harness, not new hardware: the same kernel and veth links
as Mininet, reached over SSH. Agreement is the point: the SSH path must not change what a figure
measures.
"""
from __future__ import annotations

import argparse
import json
import sys

import pandas as pd

from experiments import common, delay, workload
from experiments.common import mean_ci, progress

NAME = "remote_example"
KB = 1024
FIG5 = ["router", "mimbox-static", "haproxy-1t-tcp", "read/write"]
TABLE1 = ["router", "read/write", "mimbox (TCP server)"]
FULL = dict(reps=5, seconds=3, measures=100)
QUICK = dict(reps=3, seconds=2, measures=50)
ENVS = ("local", "rig")


def overrides(figure: str, params: dict) -> dict:
    """The figure's parameters for this example (the systems chosen as `compare` chooses them)."""
    from experiments.compare import Selection
    if figure == "fig5":
        return dict(sizes={"converter-bound": [KB]}, reps=params["reps"], seconds=params["seconds"],
                    systems=Selection(FIG5))
    return dict(idle=["halt"], measures=params["measures"], interval=0.05, systems=Selection(TABLE1))


def run_env(env: str, params: dict, out) -> dict[str, pd.DataFrame]:
    """Both figures in one environment, into out/env/."""
    from topologies.sshrig import SSHRig
    common.RESULTS = out / env
    frames = {}
    if env == "local":
        for name, module in (("fig5", workload), ("table1", delay)):
            progress(f"remote_example: {name} on this machine (Mininet)")
            frames[name] = common.run_experiment(module, False, overrides(name, params))
        return frames
    with SSHRig() as rig:
        with common.remote_lab(rig.write_hosts_file()):
            for name, module in (("fig5", workload), ("table1", delay)):
                progress(f"remote_example: {name} over SSH on the rig")
                frames[name] = common.run_experiment(module, False, overrides(name, params))
    return frames


def ratios(fig5: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per environment and repetition: each converter's req/s over HAProxy-1t's and the router's (same rep)."""
    rows = []
    for env, df in fig5.items():
        for rep, g in df.groupby("rep"):
            rate = g.set_index("system")["req_per_s"]
            for s in FIG5[1:]:
                rows.append({"env": env, "rep": rep, "system": s, "req_per_s": rate[s],
                             "vs_haproxy_1t": rate[s] / rate["haproxy-1t-tcp"], "vs_router": rate[s] / rate["router"]})
    return pd.DataFrame(rows)


def summary(r: pd.DataFrame, table1: dict[str, pd.DataFrame]) -> tuple[dict, pd.DataFrame]:
    """Means and 95 % CIs per environment; agreement: the two intervals overlap."""
    out = {}
    for (system, env), g in r.groupby(["system", "env"]):
        m, ci = mean_ci(g.vs_haproxy_1t)
        mr, cir = mean_ci(g.vs_router)
        out.setdefault(system, {})[env] = {"vs_haproxy_1t": [round(m, 3), round(ci, 3)],
                                           "vs_router": [round(mr, 3), round(cir, 3)],
                                           "req_per_s": round(float(g.req_per_s.mean()))}
    for system, envs in out.items():
        if set(ENVS) <= set(envs):
            (a, da), (b, db) = envs["local"]["vs_haproxy_1t"], envs["rig"]["vs_haproxy_1t"]
            envs["agree_within_spread"] = abs(a - b) <= da + db
    delays = pd.concat([df.assign(env=env) for env, df in table1.items()]).groupby(
        ["env", "system", "segment"]).delay_us.median().round(1).unstack("env").reset_index()
    return out, delays


def report(out) -> str:
    """results/remote_example/README.md, from the files of the run (ratios.csv, delays.csv, summary.json)."""
    s = json.loads((out / "summary.json").read_text())
    delays = pd.read_csv(out / "delays.csv")
    fig5 = s["fig5_1kb_converter_bound"]
    quota = {env: json.loads((out / env / "fig5_workload" / "manifest.json").read_text())["regimes"]
             ["converter-bound"].get("cores_per_loop") for env in ENVS}
    lines = ["# The same figure points locally (Mininet) and over SSH (the rig)", "",
             "Generated by `python -m experiments.remote_example` (`./mimbox.sh remote-example`) from the files",
             "beside it: `local/` and `rig/` hold each figure's data and manifest as a figure run writes them",
             "(`rig/*/manifest.json` has the `remote` section: every host's facts and steal).", "",
             f"Fig. 5, converter-bound, 1 KB, {s['params']['reps']} repetitions x {s['params']['seconds']} s, "
             f"CPU quota per loop calibrated in each: local {quota['local']}, rig {quota['rig']} cores.", "",
             "| system | local req/s | rig req/s | vs HAProxy-1t local | vs HAProxy-1t rig | agree within spread |",
             "|---|---|---|---|---|---|"]
    for system in FIG5[1:]:
        e = fig5[system]
        lines.append(f"| {system} | {e['local']['req_per_s']:,} | {e['rig']['req_per_s']:,} | "
                     f"{e['local']['vs_haproxy_1t'][0]:.3f} ± {e['local']['vs_haproxy_1t'][1]:.3f} | "
                     f"{e['rig']['vs_haproxy_1t'][0]:.3f} ± {e['rig']['vs_haproxy_1t'][1]:.3f} | "
                     f"{'yes' if e.get('agree_within_spread') else 'no'} |")
    lines += ["", "(mean ± 95 % CI of the per-repetition ratio; each repetition measures every system once, "
              "interleaved.)", "", f"Table 1, halt regime, {s['params']['measures']} bursts: median delay inside "
              "the converter host [µs]", "", "| system | segment | local | rig |", "|---|---|---|---|"]
    for row in delays.itertuples():
        lines.append(f"| {row.system} | {row.segment} | {row.local} | {row.rig} |")
    lines += ["", "On one machine the rig measures the harness, not new hardware: the same kernel and veth links",
              "as Mininet, reached over SSH. That the two agree is what this run shows: the SSH path does not",
              "change what a figure measures.", ""]
    text = "\n".join(lines)
    (out / "README.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and bursts")
    ap.add_argument("--report", action="store_true", help="only write README.md from the files of the last run")
    a = ap.parse_args(argv)
    params = QUICK if a.quick else FULL
    out = common.RESULTS / NAME
    if a.report:
        print(report(out))
        return 0
    frames = {env: run_env(env, params, out) for env in ENVS}
    r = ratios({env: f["fig5"] for env, f in frames.items()})
    s, delays = summary(r, {env: f["table1"] for env, f in frames.items()})
    r.round(4).to_csv(out / "ratios.csv", index=False)
    delays.to_csv(out / "delays.csv", index=False)
    (out / "summary.json").write_text(json.dumps({"params": params, "fig5_1kb_converter_bound": s}, indent=2))
    for system, envs in s.items():
        progress(f"{system}: vs haproxy-1t local {envs['local']['vs_haproxy_1t']}, rig {envs['rig']['vs_haproxy_1t']}"
                 f" -> agree: {envs.get('agree_within_spread')}")
    print(report(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
