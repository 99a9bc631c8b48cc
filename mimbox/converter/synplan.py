"""Decided once at set-up (by the relay alone, or by the supervisor for all its workers,
mimbox.converter.workers): how a listener's client SYNs reach it, what the process may hold, and what its
core is told (struct core_config)."""
from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from mimbox.codes import DST_EXPLICIT, DST_PYTHON, DST_STATIC, DST_TRANSPARENT, ENGINES, MAX_SOURCES, SYN_PATHS
from mimbox.config import Config
from mimbox.converter.core import port_n
from mimbox.converter.layouts import ADDR, CoreConfig
from mimbox.host.netfilter import ListenerRules
from mimbox.host.synack import SynAckOptions
from mimbox.host.synrecord import SynRecorder
from mimbox.wire import addrs
from mimbox.wire.rfc8803 import HEADER_FIELD

log = logging.getLogger("mimbox")


@dataclass
class SynPlan:
    """How a listener's client SYNs reach it, decided once (by the relay, or by the supervisor for
    all its workers): whether any visits NFQUEUE, at what rate per client /24 (auto), the BPF
    recorder that tells explicit mode the destination of SYNs that did not, and (convert mode) the
    BPF program that keeps the servers' SYN-ACK options for the answers (mimbox.host.synack)."""
    queue: bool
    hold_rate: int | None = None          # None: every SYN that matches is queued
    recorder: SynRecorder | None = None
    synack: SynAckOptions | None = None

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
        if self.synack is not None:
            self.synack.remove()
            self.synack = None


def plan_syns(cfg: Config) -> SynPlan:
    """hold: every SYN queued and held. accept: none queued, except in explicit mode without the
    BPF recorder (queued only to read DST_OPT, released at once). auto: queued (and held under the
    caps) up to --hold-rate per client /24, the rest straight to the kernel; again every SYN queued
    in explicit mode without the recorder."""
    lc = cfg.listener
    if lc.mode == "convert":            # the kernel accepts at the SYN (TFO): the message is the first bytes
        try:
            return SynPlan(queue=False, synack=SynAckOptions().install())
        except (RuntimeError, OSError) as e:
            log.warning("no BPF SYN-ACK reader (%s): answers carry an empty Extended TCP Header TLV", e)
            return SynPlan(queue=False)
    if lc.syn_path == "hold":
        return SynPlan(queue=True)
    recorder = None
    if lc.mode == "explicit" and lc.syn_recorder:
        try:
            recorder = SynRecorder(lc.port).install()
        except (RuntimeError, OSError) as e:
            log.warning("no BPF SYN recorder (%s): every SYN visits the converter to be read", e)
    needs_queue = lc.mode == "explicit" and recorder is None
    if lc.syn_path == "accept":
        return SynPlan(queue=needs_queue, recorder=recorder)
    return SynPlan(queue=True, hold_rate=None if needs_queue else lc.hold_rate, recorder=recorder)


def listener_rules(cfg: Config, plan: SynPlan, workers: int = 1) -> ListenerRules:
    """The netfilter rules a listener of `cfg` needs (installed by the relay, or by the supervisor)."""
    lc = cfg.listener
    return ListenerRules(port=lc.port, queue_num=lc.queue_num, listen_addr=lc.addr,
                         transparent_ports=lc.intercept_ports if lc.mode == "transparent" else (),
                         transparent_from=lc.intercept_from, workers=workers, queue_syns=plan.queue,
                         hold_rate=plan.hold_rate)


SPLICE_AFTER = 256 << 10     # engine auto: a direction copies its first bytes, then splices


def core_config(cfg, *, worker: int, workers: int, fd_capacity: int, admission, held, syns_queued: bool,
                recorder_fd: int, synack_fd: int = -1, values_only: bool = False) -> CoreConfig:
    """A worker's struct core_config from a mimbox.config.Config and what the worker set up: the
    shared admission counter (mimbox.converter.synpath.Admission), the workers' HeldSet (None: alone), the
    BPF recorder's map fd and the SYN-ACK options map's (-1: none)."""
    from mimbox.converter.timers import PREFIX_WAIT
    lc, bc, sc = cfg.listener, cfg.buffers, cfg.safety
    source = {"static": DST_STATIC, "transparent": DST_TRANSPARENT, "explicit": DST_EXPLICIT}.get(lc.mode, DST_PYTHON)
    slots = held.slots if held is not None else None
    values = dict(
        engine=ENGINES[bc.engine], pipe_size=bc.pipe_size, uring_buffers=bc.uring_buffers,
        splice_after=SPLICE_AFTER, dst_source=source,
        static_addr=ADDR.from_buffer_copy(addrs.packed(lc.upstream[0]) if lc.mode == "static" else bytes(16)),
        static_port=port_n(lc.upstream[1]) if lc.mode == "static" else 0,
        recorder_fd=recorder_fd, server_mptcp=int(lc.server_mptcp), server_rcvbuf=bc.server_rcvbuf or 0,
        server_sndbuf=bc.server_sndbuf or 0, fd_capacity=fd_capacity, worker=worker, workers=workers,
        syns_queued=int(syns_queued), server_mptcp_retry=sc.server_mptcp_retry, connect_timeout=sc.connect_timeout,
        idle_timeout=sc.idle_timeout, prefix_wait=PREFIX_WAIT,
        admission=admission.address(), admission_limit=admission.limit,
        held_slots=ctypes.addressof(slots) if slots is not None else None,
        held_mask=held.mask if held is not None else 0,
        syn_path=SYN_PATHS[lc.syn_path], pending_limit=lc.pending_limit,
        pending_per_prefix=lc.pending_per_prefix, pending_per_address=lc.pending_per_address, explicit_opt=int(lc.mode == "explicit"),
        handshake_timeout=sc.handshake_timeout, spare_sockets=lc.spare_sockets, busy_poll_us=lc.busy_poll_us,
        access_log_every=cfg.access_log_every, convert_header_field=HEADER_FIELD[lc.convert_compat],
        synack_fd=synack_fd, nsources=min(len(lc.source_addresses), MAX_SOURCES),
        source_addrs=(ctypes.c_uint8 * (16 * MAX_SOURCES)).from_buffer_copy(
            b"".join(addrs.packed(a) for a in lc.source_addresses[:MAX_SOURCES]).ljust(16 * MAX_SOURCES, b"\0")))
    return values if values_only else fitted(**values)


def misfits(values: dict) -> list[tuple[str, str]]:
    """(field, why) for every value that does not fit its CoreConfig field as the generated layout
    declares it (ctypes would wrap 2**32 to 0 silently)."""
    from mimbox.converter.layouts import field_problem
    return [(name, why) for name, value in values.items() if (why := field_problem(CoreConfig, name, value))]


def fitted(**values) -> CoreConfig:
    """A CoreConfig of `values`; ValueError naming the first field a value does not fit."""
    bad = misfits(values)
    if bad:
        raise ValueError(bad[0][1])
    return CoreConfig(**values)


def core_config_problems(cfg) -> list[tuple[str, str]]:
    """Config.problems()'s part: every value the core gets from `cfg`, checked against the layout
    (stand-ins for what only a running worker has), as (config key, message)."""
    from types import SimpleNamespace

    from mimbox.config import config_key
    stand_in = SimpleNamespace(address=lambda: None, limit=cfg.connection_limit())
    try:
        values = core_config(cfg, worker=0, workers=1, fd_capacity=1, admission=stand_in, held=None,
                             syns_queued=True, recorder_fd=-1, values_only=True)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError):
        return []       # (a value another check refuses, by name)
    fed_by = {"admission_limit": "safety.max_connections"}    # core fields named unlike their key
    return [(fed_by.get(name) or config_key(name), why) for name, why in misfits(values)]
