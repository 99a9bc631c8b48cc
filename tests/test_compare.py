"""`./mimbox.sh compare` as a researcher uses it: a converter of their own as a command line and as a
System subclass, one tiny point, ratios to a baseline, the conversion check, and nothing written
into the shipped results/ or README."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from conftest import PY

from experiments import compare

ROOT = Path(__file__).resolve().parent.parent
SOCAT = "socat TCP-LISTEN:{listen_port},fork,reuseaddr,backlog=512 TCP:{server}:{server_port}"


def tree_digest(*paths: Path) -> str:
    """Names, sizes and contents of every file under `paths`."""
    h = hashlib.sha1()
    for root in paths:
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for f in files:
            if f.is_file():
                h.update(str(f.relative_to(ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "experiments.compare", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_compare_a_command_line_converter(mptcp_ok, tmp_path):
    """router, MiMBox, HAProxy and two socat converters at 1 KB: the one whose listener is MPTCP (the
    shim, listen-only; a System subclass from a file) converts, the plain one is flagged as taking
    no MPTCP from clients; every row has its conversion columns; ratios to HAProxy are written;
    results/ and README are untouched."""
    before = tree_digest(ROOT / "results", ROOT / "README.md")
    out = tmp_path / "cmp"
    p = run("--figure", "fig5", "--systems", "router,mimbox,haproxy-1t,socat,my-socat",
            "--system", f"socat={SOCAT}",
            "--system", "my-socat=@experiments/examples/my_converter.py:SocatMptcp",
            "--sizes", "1K", "--reps", "1", "--seconds", "1", "--baseline", "haproxy-1t", "--quota", "0.25",
            "--out", str(out))     # (a fixed quota: the calibration is test_fig5_workload_tiny's)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    df = pd.read_csv(out / "fig5_workload" / "data.csv")
    assert set(df.system) == {"router", "mimbox", "haproxy-1t", "socat", "my-socat"}
    assert (df.req_per_s > 0).all() and (df.non_2xx == 0).all()
    row = {r.system: r for r in df.itertuples()}
    assert row["my-socat"].mptcp_syns_from_clients >= row["my-socat"].requests > 0      # MPTCP clients
    assert row["my-socat"].mptcp_syns_to_servers == 0                                  # TCP to the server
    assert row["socat"].mptcp_syns_from_clients == 0
    assert row["mimbox"].mptcp_syns_from_clients >= row["mimbox"].requests
    assert row["router"].mptcp_syns_from_clients == 0        # forwarded, not terminated
    r = pd.read_csv(out / "ratios.csv").set_index("system")["req_per_s_vs_haproxy-1t"]
    assert r["haproxy-1t"] == 1.0 and 0 < r["my-socat"] < 10
    report = (out / "report.txt").read_text()
    assert "socat: took no MPTCP connection" in report and "my-socat" not in report.replace("socat:", "")
    assert "1 repetition per point" in report
    man = (out / "fig5_workload" / "manifest.json").read_text()
    assert "mimbox_describe" in man and "my-socat=" in man
    assert (out / "fig5_workload" / "figure.png").exists()
    assert tree_digest(ROOT / "results", ROOT / "README.md") == before


def test_mptcpize_run_is_flagged_for_mptcp_to_the_server():
    """What `mptcpize run` does (every socket MPTCP) seen in the MIB columns: flagged."""
    df = pd.DataFrame([dict(system="x", mptcp_syns_from_clients=100, mptcp_syns_to_servers=98),
                       dict(system="ok", mptcp_syns_from_clients=100, mptcp_syns_to_servers=1)])
    flags = compare.conversion_flags(df, {"x", "ok"})
    assert len(flags) == 1 and flags[0].startswith("x: sent 98 MP_CAPABLE SYNs towards the TCP server")


@pytest.mark.parametrize("args, words", [
    (["--systems", "router,nope"], "no system 'nope'"),
    (["--system", "x=socat {port}"], "unknown placeholder"),
    (["--system", "x=socat TCP:{server}:{server_port}"], "must listen on {listen_port}"),
    (["--system", "mimbox=socat {listen_port}"], "a name the figure already has"),
    (["--figure", "table1", "--reps", "2"], "--reps: table1"),
    (["--figure", "percost", "--sizes", "1K,2K"], "one size"),
    (["--sizes", "1Q"], "not a size"),
    (["--seconds", "0"], "--seconds"),
    (["--out", str(ROOT / "results")], "shipped results/"),
    (["--baseline", "squid", "--systems", "mimbox"], "--baseline 'squid'"),
    (["--system", "y=@/nonexistent.py:C"], "no file"),
    (["--systems", "mimbox,mimbox-2w"], "calibrated against the router"),   # (it was a StopIteration)
])
def test_bad_parameters_get_one_clear_line(args, words):
    p = run(*args, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("compare: ") and words in p.stderr, p.stderr
    assert "Traceback" not in p.stderr


def test_a_float_seconds_is_refused_by_argparse_not_wrk():
    p = run("--seconds", "3.5", timeout=60)
    assert p.returncode == 2 and "invalid int value" in p.stderr and "Usage: wrk" not in p.stdout


def test_styles_are_fixed_and_distinct():
    """One colour and marker per system, the same across figures; no two alike in a figure, also
    for systems the table does not list."""
    from experiments.style import STYLES, styles
    colours = [c for c, _ in STYLES.values()]
    assert len(set(colours)) == len(colours)
    names = [*STYLES, "mimbox-12w", "socat", "my-socat", "other"]
    got = styles(names)
    pairs = [(v["color"], v["marker"]) for k, v in got.items() if k != "mimbox-12w"]
    assert len(set(pairs)) == len(pairs) and len({v["color"] for k, v in got.items() if k != "mimbox-12w"}) == len(pairs)
    assert styles(["squid"])["squid"] == styles(["router", "squid"])["squid"]
    assert got["mimbox-12w"] == got["mimbox-4w"] != got["mimbox-2w"]      # many workers: one family, not 2w's


@pytest.mark.parametrize("module,result", [("buffers", "fig6_buffers"), ("workload", "fig5_workload")])
def test_figures_draw_each_system_in_its_shared_style_with_the_legend_off_the_data(module, result):
    """Every series of a system has the colour and marker experiments.style gives it (the same in every
    figure), and the legend is the figure's, right of the panels, not inside one."""
    import importlib

    import matplotlib.colors as mcolors

    from experiments.style import styles
    df = pd.read_csv(ROOT / "results" / result / "data.csv")
    fig = importlib.import_module(f"experiments.{module}").plot(df)
    from matplotlib.container import ErrorbarContainer
    systems = set(df.system)
    series = [(c.get_label(), c.lines[0]) for ax in fig.axes for c in ax.containers
              if isinstance(c, ErrorbarContainer) and c.get_label() in systems]
    series += [(ln.get_label(), ln) for ax in fig.axes for ln in ax.get_lines() if ln.get_label() in systems]
    drawn = {name for name, _ in series}
    want = styles(s for s in df.system if s in drawn)       # the systems drawn, in the data's order
    assert series, "no series drawn per system"
    for name, ln in series:
        st = want[name]
        assert mcolors.same_color(ln.get_color(), st["color"]) and ln.get_marker() == st["marker"], name
    assert all(ax.get_legend() is None for ax in fig.axes) and fig.legends


def test_one_size_is_drawn_as_labelled_bars_and_paper_stars_do_not_stretch_the_axis():
    from experiments import workload
    df = pd.read_csv(ROOT / "results" / "fig5_workload" / "data.csv")
    one = df[(df["size"] == 1024) & (df.rep == 0)]
    fig = workload.plot(one)
    ax = fig.axes[0]
    assert len(ax.patches) == one[one.regime == "converter-bound"].system.nunique()
    assert any(t.get_text().isdigit() for t in ax.texts)                   # the values printed
    assert any("1 repetition" in t.get_text() for t in fig.texts)
    many = workload.plot(df[df["size"] >= 64 * 1024])                       # the paper's stars are at 1 KB
    lo, hi = many.axes[0].get_ylim()
    assert hi < 9_500, "a paper value outside the data set the axis range"


def _figure_systems() -> dict[str, list[str]]:
    """Every figure's systems, by the module's own list (no run)."""
    from experiments import concurrency, delay, goodput, percost, uring, workload
    from topologies.regimes import CONVERTER_BOUND, END_HOST_BOUND
    return {"workload": [s.name for r in (CONVERTER_BOUND, END_HOST_BOUND) for s in workload.systems(r)],
            "goodput": [s.name for s in goodput.systems()],
            "uring": [s.name for s in uring.small_systems() + uring.bulk_systems()],
            "percost": [s.name for s in percost.systems()],
            "concurrency": [s.name for s, _, _ in concurrency.systems([1000, 10_000, 100_000])],
            "delay": [name for name, _, _ in delay.cases({"poll_ns": 1000})]}


def test_concurrency_runs_only_the_systems_named_beside_the_router():
    from experiments import concurrency
    names = [s.name for s, _, _ in concurrency.systems([1000, 3000], only=["mimbox-1w", "haproxy-1t-tcp"])]
    assert names == ["router", "mimbox-1w", "haproxy-1t-tcp"]
    with pytest.raises(ValueError, match="no system haproxy-9t"):
        concurrency.systems([1000], only=["haproxy-9t"])


def test_every_system_of_every_figure_has_its_entry_and_no_two_series_of_a_figure_are_alike():
    from experiments.style import _known, styles
    for figure, names in _figure_systems().items():
        assert not [n for n in names if _known(n) is None], (figure, [n for n in names if _known(n) is None])
        got = styles(names)
        pairs = [(v["color"], v["marker"]) for v in got.values()]
        assert len(set(pairs)) == len(pairs), (figure, got)


@pytest.mark.parametrize("module,result", [("uring", "uring_engine"), ("scaleout", "scaleout")])
def test_bar_and_line_figures_take_the_shared_style(module, result):
    import importlib

    import matplotlib.colors as mcolors

    from experiments.style import styles
    df = pd.read_csv(ROOT / "results" / result / "data.csv")
    fig = importlib.import_module(f"experiments.{module}").plot(df)
    if module == "uring":
        ax = fig.axes[0]
        names = [t.get_text() for t in ax.get_xticklabels()]
        want = styles(names)
        assert names and all(mcolors.same_color(p.get_facecolor(), want[n]["color"]) for p, n in zip(ax.patches, names))
    else:
        line = fig.axes[0].containers[0].lines[0]
        assert mcolors.same_color(line.get_color(), styles(["mimbox"])["mimbox"]["color"])
        assert line.get_marker() == styles(["mimbox"])["mimbox"]["marker"]
