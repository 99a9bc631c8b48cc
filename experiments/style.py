"""One colour and marker per system, the same in every figure (declared here only). A system not
listed (a researcher's own, from `compare --system`) gets a colour and marker no listed system
uses, distinct from the other unlisted systems of the same figure."""
from __future__ import annotations

# the tab10/tab20 colours, each used once among the systems we ship
STYLES: dict[str, tuple[str, str]] = {
    "router": ("#7f7f7f", "s"),
    "mimbox": ("#1f77b4", "o"),
    "mimbox-static": ("#17becf", "v"),
    "mimbox-convert": ("#aec7e8", "^"),
    "mimbox-1w": ("#5254a3", "s"),
    "mimbox-2w": ("#393b79", "D"),
    "mimbox-4w": ("#637939", "X"),           # and every mimbox-Nw with N >= 3
    "mimbox-uring": ("#6b6ecf", "P"),
    "haproxy-1t": ("#ff7f0e", "o"),
    "haproxy-1t-tcp": ("#ffbb78", "v"),
    "haproxy-1t-mptcp-server": ("#8c564b", "^"),
    "haproxy-2t": ("#d62728", "D"),
    "haproxy-2t-tcp": ("#ad494a", "v"),
    "squid": ("#2ca02c", "P"),
    "nginx-stream-1w": ("#8ca252", "*"),
    "nginx-stream-2w": ("#7b4173", "p"),
    "splice": ("#9467bd", "X"),
    "read/write": ("#e377c2", "h"),
    # MiMBox's configurations beside its default (percost, uring): the SYN path, the engine
    "mimbox-hold": ("#3182bd", "<"),
    "mimbox-splice-hold": ("#9ecae1", ">"),
    "mimbox-accept": ("#6baed6", "d"),
    "mimbox-static-accept": ("#74c476", "v"),
    "mimbox-copy": ("#9c9ede", "o"),
    # Table 1's cases (experiments.delay: a configuration and the server it reaches)
    "mimbox (TCP server)": ("#08519c", "o"),
    "mimbox busy-poll (TCP server)": ("#e6550d", "D"),
    "mimbox (MPTCP server)": ("#756bb1", "^"),
    "mimbox accept-first (TCP server)": ("#843c39", "d"),
}
# for systems not listed above, in order of appearance in a figure
EXTRA_COLOURS = ("#bcbd22", "#000000", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d")
EXTRA_MARKERS = ("*", "p", "<", ">", "8", "d", "H", "1")


def _known(name: str) -> str | None:
    """A listed style for `name`, or for the family it belongs to (mimbox-12w -> mimbox-4w's: many workers)."""
    if name in STYLES:
        return name
    for prefix, family in (("mimbox-", "mimbox-4w"), ("haproxy-", "haproxy-2t")):
        if name.startswith(prefix) and name.endswith(("w", "t")) and name[len(prefix):-1].isdigit():
            return family
    return None


def styles(names) -> dict[str, dict]:
    """{system: {"color": ..., "marker": ...}} for the systems of one figure, no two alike."""
    out, extra = {}, 0
    for name in dict.fromkeys(names):
        key = _known(name)
        if key is not None:
            colour, marker = STYLES[key]
        else:
            colour, marker = EXTRA_COLOURS[extra % len(EXTRA_COLOURS)], EXTRA_MARKERS[extra % len(EXTRA_MARKERS)]
            extra += 1
        out[name] = {"color": colour, "marker": marker}
    return out


def few_reps_warning(fig, reps: int) -> None:
    """Say on the figure that its error bars mean little (fewer than 3 repetitions)."""
    if reps < 3:
        fig.text(0.5, 0.93, f"{reps} repetition{'s' * (reps != 1)} per point: "
                 + ("no error bars" if reps < 2 else "error bars from 2 values") + " (use >= 3)",
                 ha="center", va="bottom", color="#d62728", fontsize=8)


def legend_outside(fig, axes) -> None:
    """One legend for every panel's series (each once), right of the panels, off the data."""
    seen = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), fontsize=7, loc="upper left", bbox_to_anchor=(0.91, 0.88))
