"""Netfilter rules owned by one converter listener: installed at start, removed at exit.

Every rule lives in chains named MIMBOX-<port> (raw, mangle and filter tables), reached by one
jump each; `remove()` deletes the jumps and the chains, and `install()` first removes what a
killed predecessor on the same port may have left. Each jump matches only the packets its chain
acts on (SYNs; marked packets; TCP), and a raw chain with no queue rule gets no jump: every packet
that reaches the converter's namespace walks these hooks (about 0.4 us per 1 KB request when
every packet entered every chain, results/profile_converter).

    raw/PREROUTING     client SYNs to the listener (or, transparent, to intercepted ports)
                       -> NFQUEUE: held until the converter has connected to the server
                       (with --syn-path auto, up to a rate per client /24; none with accept)
    mangle/PREROUTING  transparent mode only: TPROXY to the listener of that port, mark for local delivery
    filter/INPUT       SYNs the converter refused (marked in the verdict) -> TCP RST

The rules exist once per family the listener serves: iptables for IPv4, ip6tables for IPv6 (a
listener on [::] serves both; one on an IPv4 or IPv6 address its own family). The IPv6 rules match a
TCP header right after the fixed 40-byte header; a SYN with extension headers skips the queue (the
kernel answers it, and the converter judges the client at accept() as for any SYN it did not hold).
"""
from __future__ import annotations

import ipaddress
import shlex
import subprocess
from dataclasses import dataclass

from mimbox.codes import REFUSE_MARK, REFUSE_MASK  # noqa: F401 - declared with the codes C shares

TPROXY_MARK = 0x1
TPROXY_TABLE = 4242
# MP_JOIN SYNs join an existing connection: the kernel alone handles them, so they need not visit
# the queue. Linux puts the MPTCP option 20 bytes into a SYN's options (after MSS, SACK_PERM+TS,
# NOP+WS): kind 30, length 12, subtype 1. A join laid out differently is still queued, and then
# released at once by the relay (which checks every option), so this is only a fast path.
NOT_MP_JOIN = {4: ["-m", "u32", "!", "--u32", "0>>22&0x3C@40>>8&0xFFFFF0=0x1E0C10"],
               6: ["-m", "u32", "!", "--u32", "80>>8&0xFFFFF0=0x1E0C10"]}
# u32: the TCP source port's low byte (the header starts after IPv4's IHL words, after IPv6's 40 bytes)
SPORT_LOW_BYTE = {4: "0>>22&0x3C@0>>16&0xFF", 6: "40>>16&0xFF"}
# the client prefix a hold rate counts by: /24 (IPv4), /64 (IPv6), as the core's gate
CLIENT_PREFIX = {4: 24, 6: 64}
ANY = {4: "0.0.0.0", 6: "::"}


def worker_of_port(sport: int, workers: int) -> int:
    """Which worker holds the SYN of a client using source port `sport` (low byte, split evenly).

    The queue rules (below) and the relay's accept path both use this one function: a worker that
    accept()s a connection whose SYN another worker held hands the socket to that worker."""
    return ((sport & 0xFF) * workers) >> 8


def worker_port_ranges(workers: int) -> list[tuple[int, int]]:
    """For each worker, the (lowest, highest) source-port low byte it owns (contiguous, by construction)."""
    ranges: list[list[int]] = [[256, -1] for _ in range(workers)]
    for b in range(256):
        r = ranges[worker_of_port(b, workers)]
        r[0], r[1] = min(r[0], b), max(r[1], b)
    return [(lo, hi) for lo, hi in ranges]


def ipt(*args: str, check: bool = True, family: int = 4) -> subprocess.CompletedProcess:
    """iptables (family 4) or ip6tables (6)."""
    tool = "iptables" if family == 4 else "ip6tables"
    p = subprocess.run([tool, "-w", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{tool} {' '.join(args)}: {p.stderr.strip()}")
    return p


def ip(*args: str, check: bool = False, family: int = 4) -> subprocess.CompletedProcess:
    p = subprocess.run(["ip", f"-{family}", *args], capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"ip -{family} {' '.join(args)}: {p.stderr.strip()}")
    return p


def families_of(listen_addr: str) -> tuple[int, ...]:
    """The families a listener on `listen_addr` serves: [::] both, an address its own."""
    if listen_addr == "::":
        return (4, 6)
    return (ipaddress.ip_address(listen_addr).version,)


@dataclass
class ListenerRules:
    """The rules of one listener. Use as a context manager, or install()/remove()."""
    port: int
    queue_num: int
    listen_addr: str = "0.0.0.0"
    transparent_ports: tuple[int, ...] = ()
    transparent_from: tuple[str, ...] = ()
    workers: int = 1              # SYNs split by source port over queues queue_num .. queue_num+workers-1
    queue_syns: bool = True       # False: no SYN visits the converter (static/transparent, --syn-path accept)
    hold_rate: int | None = None  # queue at most this many SYNs/s per client /24 (per worker); None: all

    @property
    def chain(self) -> str:
        return f"MIMBOX-{self.port}"

    def _jumps(self) -> list[tuple[str, str, list[str]]]:
        """(table, hook, match) of each jump into this listener's chains: only what the chain acts on."""
        # the refusal mark: a queued SYN's verdict, or the BPF recorder's on a SYN whose DST_OPT
        # conflicts with its 4-tuple's first (explicit mode, SYNs not queued): always needed
        jumps = [("filter", "INPUT", ["-p", "tcp", "-m", "mark", "--mark", f"0x{REFUSE_MARK:x}/0x{REFUSE_MASK:x}"])]
        if self.queue_syns:             # the queue rules see SYNs only
            jumps.append(("raw", "PREROUTING", ["-p", "tcp", "--syn"]))
        if self.transparent_ports:
            jumps.append(("mangle", "PREROUTING", ["-p", "tcp"]))
        return jumps

    @property
    def families(self) -> tuple[int, ...]:
        return families_of(self.listen_addr)

    def _sources(self, family: int) -> list[list[str]]:
        """-s matches for transparent_from's prefixes of `family` ([[]]: every source; [] none of it)."""
        if not self.transparent_from:
            return [[]]
        return [["-s", s] for s in self.transparent_from if ipaddress.ip_network(s, strict=False).version == family]

    def _syn_matches(self, family: int) -> list[list[str]]:
        syn = ["-p", "tcp", "--syn", *NOT_MP_JOIN[family]]
        if not self.transparent_ports:
            dst = [] if self.listen_addr in ANY.values() else ["-d", self.listen_addr]
            return [[*syn, *dst, "--dport", str(self.port)]]
        ports = ["-m", "multiport", "--dports", ",".join(map(str, self.transparent_ports))]
        return [[*syn, *src, *ports] for src in self._sources(family)]

    def _queues(self, family: int) -> list[tuple[int, list[str]]]:
        """(queue number, extra match) per worker: the TCP source port's low byte picks the worker."""
        if self.workers <= 1:
            return [(self.queue_num, [])]
        return [(self.queue_num + w, ["-m", "u32", "--u32", f"{SPORT_LOW_BYTE[family]}={lo}:{hi}"])
                for w, (lo, hi) in enumerate(worker_port_ranges(self.workers))]

    def _rate(self, worker: int, family: int) -> list[str]:
        """Past hold_rate SYNs/s from one client /24 (IPv6: /64), SYNs skip the queue: the kernel
        answers them (SYN cookies when its backlog is full) and the converter connects after accept()."""
        if self.hold_rate is None:
            return []
        return ["-m", "hashlimit", "--hashlimit-upto", f"{self.hold_rate}/sec", "--hashlimit-burst",
                str(self.hold_rate), "--hashlimit-mode", "srcip", "--hashlimit-srcmask", str(CLIENT_PREFIX[family]),
                "--hashlimit-name", f"mimbox{self.port}w{worker}" + ("" if family == 4 else "v6")]

    def install(self) -> "ListenerRules":
        """Remove leftovers of an earlier run on this port, then install this listener's rules."""
        self.remove()
        try:
            for family in self.families:
                self._install(family)
        except Exception:
            self.remove()
            raise
        return self

    def _install(self, family: int) -> None:
        def run(*args: str) -> None:
            ipt(*args, family=family)
        for table in ("raw", "mangle", "filter"):
            run("-t", table, "-N", self.chain)
        for m in self._syn_matches(family) if self.queue_syns else ():
            for w, (queue, split) in enumerate(self._queues(family)):
                run("-t", "raw", "-A", self.chain, *m, *split, *self._rate(w, family), "-j", "NFQUEUE",
                    "--queue-num", str(queue))
        run("-t", "filter", "-A", self.chain, "-p", "tcp", "-m", "mark", "--mark",
            f"0x{REFUSE_MARK:x}/0x{REFUSE_MASK:x}", "-j", "REJECT", "--reject-with", "tcp-reset")
        if self.transparent_ports:
            # TPROXY each port to a listener on that same port: MPTCP refuses an MP_JOIN whose
            # destination port differs from its listener's (MismatchPortSynRx).
            for port in self.transparent_ports:
                for src in self._sources(family):
                    run("-t", "mangle", "-A", self.chain, "-p", "tcp", *src, "--dport", str(port), "-j", "TPROXY",
                        "--on-port", str(port), "--on-ip", ANY[family],
                        "--tproxy-mark", f"0x{TPROXY_MARK:x}/0x{TPROXY_MARK:x}")
            if str(TPROXY_TABLE) not in ip("rule", "show", family=family).stdout:
                ip("rule", "add", "fwmark", f"0x{TPROXY_MARK:x}/0x{TPROXY_MARK:x}", "lookup",
                   str(TPROXY_TABLE), check=True, family=family)
            ip("route", "replace", "local", "0.0.0.0/0" if family == 4 else "::/0", "dev", "lo", "table",
               str(TPROXY_TABLE), check=True, family=family)
        for table, hook, match in self._jumps():
            run("-t", table, "-I", hook, "1", *match, "-j", self.chain)

    def remove(self) -> None:
        """Delete this listener's jumps and chains (and the TPROXY route), both families; quiet if absent."""
        for family in (4, 6):
            for table, hook in (("raw", "PREROUTING"), ("mangle", "PREROUTING"), ("filter", "INPUT")):
                listed = ipt("-t", table, "-S", hook, check=False, family=family).stdout.splitlines()
                for rule in listed:         # the jumps, whatever they match (as `-S` prints them)
                    words = shlex.split(rule)
                    if words[:2] == ["-A", hook] and words[-2:] == ["-j", self.chain]:
                        ipt("-t", table, "-D", *words[1:], check=False, family=family)
                ipt("-t", table, "-F", self.chain, check=False, family=family)
                ipt("-t", table, "-X", self.chain, check=False, family=family)
            if self.transparent_ports and "TPROXY" not in ipt("-t", "mangle", "-S", check=False, family=family).stdout:
                ip("rule", "del", "fwmark", f"0x{TPROXY_MARK:x}/0x{TPROXY_MARK:x}", "lookup", str(TPROXY_TABLE),
                   family=family)
                ip("route", "flush", "table", str(TPROXY_TABLE), family=family)

    def __enter__(self) -> "ListenerRules":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.remove()
