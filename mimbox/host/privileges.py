"""Least privilege: what a worker keeps once its set-up is done.

The supervisor (root) installs the rules and the BPF recorder and removes them at the end; each
worker opens its listener, queue and stats socket as root, then calls `drop()`:

    1. the capability bounding set is emptied but for what the worker still needs;
    2. groups, then gid, then uid become the service user's (--user, default `mimbox`);
    3. the permitted and effective sets are reduced to `needed_capabilities()` (libcap);
    4. PR_SET_NO_NEW_PRIVS: nothing it could execute gains privileges;
    5. the parent-death signal is set again (a credential change clears it);
    6. a seccomp filter (libseccomp): the system calls a worker makes are allowed, a short list of
       calls no worker has any business making (execve, ptrace, mount, module and key calls, ...)
       kill the process, and anything else fails with EPERM.

What each mode needs after set-up, probed on Linux 6.18 (tests/test_hostile.py asserts it from
/proc): a worker that holds SYNs sends NFQUEUE verdicts, which nfnetlink accepts only from a
sender with CAP_NET_ADMIN; every other call (accept, connect, splice, the BPF recorder's map through
its already open fd, the stats and netlink sockets already bound) needs none.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import pwd
import signal

# linux/capability.h
CAPABILITIES = {"CAP_KILL": 5, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13,
                "CAP_SYS_ADMIN": 21, "CAP_BPF": 39}
# What the supervisor (uid 0) keeps once the converter serves (docs/operating.md says why):
#   CAP_NET_ADMIN  remove the listener's and SYN queue's rules, the tc SYN recorder and the cgroup
#                  SYN-ACK program at exit (iptables/nft, tc, bpftool inherit it as uid 0)
#   CAP_BPF        open the pinned BPF objects to detach them at exit
#   CAP_KILL       stop its workers and metrics process, which run as the service user
SUPERVISOR_CAPABILITIES = ("CAP_NET_ADMIN", "CAP_BPF", "CAP_KILL")
CAP_LAST = 40
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 1, 8, 24, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4

# Calls that kill a worker at once: what an attacker who took over one would want.
KILL = ("execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2",
        "pivot_root", "chroot", "setns", "unshare", "init_module", "finit_module", "delete_module",
        "kexec_load", "kexec_file_load", "reboot", "swapon", "swapoff", "add_key", "request_key", "keyctl",
        "perf_event_open", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
        "setgroups", "capset", "personality", "userfaultfd", "open_by_handle_at", "acct", "settimeofday",
        "clock_settime", "sethostname", "setdomainname", "iopl", "ioperm", "fork", "vfork",
        "io_uring_setup")   # a new ring's operations pass no seccomp filter; the core's ring is made before
                            # the drop and restricted to its own operations (native/core/engine_uring.c)

# What a worker (Python and the core) and its keeper call while serving: sockets, epoll, pipes and
# splice, memory, time, signals, files (log lines, /proc reads, lazy imports), the keeper's clone.
ALLOW = ("read", "write", "readv", "writev", "pread64", "pwrite64", "close", "close_range", "dup", "dup2",
         "dup3", "fcntl", "ioctl", "lseek", "openat", "open", "stat", "fstat", "lstat", "newfstatat", "statx",
         "access", "faccessat", "faccessat2", "readlink", "readlinkat", "getdents64", "getcwd", "unlink",
         "unlinkat", "socket", "socketpair", "bind", "listen", "accept", "accept4", "connect", "shutdown",
         "getsockname", "getpeername", "setsockopt", "getsockopt", "sendto", "recvfrom", "sendmsg", "recvmsg",
         "sendmmsg", "recvmmsg", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
         "poll", "ppoll", "select", "pselect6", "pipe", "pipe2", "splice", "tee", "vmsplice", "mmap", "munmap",
         "mremap", "mprotect", "madvise", "brk", "futex", "set_robust_list", "get_robust_list", "rseq",
         "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday", "time", "getrandom", "getpid",
         "gettid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getgroups", "getresuid",
         "getresgid", "uname", "sysinfo", "getrlimit", "prlimit64", "getrusage", "times", "sched_yield",
         "sched_getaffinity", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigsuspend",
         "rt_sigtimedwait", "sigaltstack", "pause", "kill", "tgkill", "tkill", "wait4", "waitid", "clone",
         "clone3", "exit", "exit_group", "prctl", "arch_prctl", "set_tid_address", "eventfd2", "timerfd_create",
         "timerfd_settime", "timerfd_gettime", "signalfd4", "membarrier", "restart_syscall", "fadvise64",
         "sync_file_range", "fsync", "fdatasync", "ftruncate", "memfd_create", "mincore", "getpgrp",
         "getpgid", "getsid", "alarm", "setitimer", "getitimer", "sched_getparam", "sched_getscheduler",
         "getpriority", "capget", "io_uring_enter", "io_uring_register",
         "bpf")      # the BPF recorder's map, through its open fd (loading a program needs CAP_BPF: gone)


def needed_capabilities(queue_syns: bool) -> tuple[str, ...]:
    """The capabilities a worker keeps after set-up (see the module's docstring)."""
    return ("CAP_NET_ADMIN",) if queue_syns else ()


def user_ids(name: str) -> tuple[int, int]:
    """(uid, gid) of the service user; ValueError with what to do if there is none."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"--user {name}: no such user (create it: `useradd --system --no-create-home "
                         f"--shell /usr/sbin/nologin {name}`, as ./mimbox.sh does; or --user root)") from None
    return pw.pw_uid, pw.pw_gid


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(r: int, what: str) -> None:
    if r != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _libcap():
    """libcap, its signatures declared (cap_get_proc, cap_from_text, cap_set_flag, cap_set_proc)."""
    lib = ctypes.CDLL(ctypes.util.find_library("cap") or "libcap.so.2", use_errno=True)
    lib.cap_get_proc.restype = lib.cap_from_text.restype = ctypes.c_void_p
    lib.cap_from_text.argtypes = [ctypes.c_char_p]
    lib.cap_set_proc.argtypes = [ctypes.c_void_p]
    lib.cap_free.argtypes = [ctypes.c_void_p]
    lib.cap_set_flag.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int),
                                 ctypes.c_int]
    return lib


def _set_capabilities(keep: tuple[str, ...]) -> None:
    """Permitted and effective sets = keep, inheritable and ambient empty (libcap's cap_set_proc)."""
    cap = _libcap()
    text = (",".join(c.lower() for c in keep) + "=ep") if keep else "="
    caps = cap.cap_from_text(text.encode())
    if not caps:
        raise OSError(ctypes.get_errno(), f"cap_from_text({text!r})")
    try:
        _check(cap.cap_set_proc(caps), "cap_set_proc")
    finally:
        cap.cap_free(caps)


def _bound(libc, keep: tuple[str, ...]) -> None:
    """The capability bounding set emptied but for `keep`."""
    wanted = {CAPABILITIES[c] for c in keep}
    for c in range(CAP_LAST + 1):
        if c not in wanted:
            r = libc.prctl(PR_CAPBSET_DROP, c, 0, 0, 0)
            if r != 0 and ctypes.get_errno() != errno.EINVAL:     # EINVAL: not a capability here
                _check(r, f"PR_CAPBSET_DROP {c}")


def _seccomp() -> None:
    import seccomp  # Debian's python3-seccomp (libseccomp)
    f = seccomp.SyscallFilter(defaction=seccomp.ERRNO(errno.EPERM))
    for name in ALLOW:
        try:
            f.add_rule(seccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass      # not a system call on this architecture
    for name in KILL:
        try:
            f.add_rule(seccomp.KILL_PROCESS, name)
        except (RuntimeError, ValueError, OSError):
            pass
    no_network_administration(seccomp)     # first: the main filter forbids loading another
    f.load()


# A second filter, stacked on the first (the kernel takes the most restrictive answer of the two):
# what CAP_NET_ADMIN, which a SYN-holding worker keeps for its NFQUEUE verdicts, would let it do to
# this host's network, refused with EPERM. Its own netlink sockets were opened before (the NFQUEUE's;
# the route sockets without the capability in force: `without`).
AF_NETLINK, SOL_SOCKET, SOL_IP, SOL_IPV6 = 16, 1, 0, 41
DENIED_IOCTLS = ((0xFFFFFF00, 0x8900),      # SIOC*: interface addresses, flags (link down), routes
                 (0xFFFFFF00, 0x8B00),      # SIOCSIW*: wireless
                 (0x4000FF00, 0x40005400))  # _IOW('T', ...): TUNSETIFF and friends (new links)
DENIED_SOCKOPTS = ((SOL_IP, 19), (SOL_IPV6, 75),               # IP_TRANSPARENT, IPV6_TRANSPARENT
                   (SOL_SOCKET, 36), (SOL_SOCKET, 32), (SOL_SOCKET, 33))   # SO_MARK, SO_*BUFFORCE


def no_network_administration(seccomp) -> None:
    """Load the second filter (see DENIED_IOCTLS, DENIED_SOCKOPTS): no new netlink socket (routes,
    addresses, links, netfilter, generic netlink), no interface or route ioctl, no tun device, no
    transparent socket, mark or forced buffer."""
    f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    eperm = seccomp.ERRNO(errno.EPERM)
    f.add_rule(eperm, "socket", seccomp.Arg(0, seccomp.EQ, AF_NETLINK))
    f.add_rule(eperm, "socketpair", seccomp.Arg(0, seccomp.EQ, AF_NETLINK))
    for mask, value in DENIED_IOCTLS:
        f.add_rule(eperm, "ioctl", seccomp.Arg(1, seccomp.MASKED_EQ, mask, value))
    for level, opt in DENIED_SOCKOPTS:
        f.add_rule(eperm, "setsockopt", seccomp.Arg(1, seccomp.EQ, level), seccomp.Arg(2, seccomp.EQ, opt))
    f.load()


@contextlib.contextmanager
def without(name: str):
    """Run the block with capability `name` out of the effective set (the permitted set keeps it):
    a netlink socket opened meanwhile never acts with it, since rtnetlink and nfnetlink ask for the
    capability of the socket's opener as well as of its sender."""
    lib = _libcap()
    before, after = lib.cap_get_proc(), lib.cap_get_proc()
    if not before or not after:
        raise OSError(ctypes.get_errno(), "cap_get_proc")
    CAP_EFFECTIVE, CAP_CLEAR = 0, 0
    try:
        _check(lib.cap_set_flag(after, CAP_EFFECTIVE, 1, (ctypes.c_int * 1)(CAPABILITIES[name]), CAP_CLEAR),
               "cap_set_flag")
        _check(lib.cap_set_proc(after), "cap_set_proc")
        try:
            yield
        finally:
            _check(lib.cap_set_proc(before), "cap_set_proc")
    finally:
        lib.cap_free(before)
        lib.cap_free(after)


def keep_only(keep: tuple[str, ...]) -> None:
    """The supervisor once serving: it stays uid 0 (it owns the root files it removes at exit) but
    keeps only the capabilities `keep`, in every set and in the bounding set (so the programs it
    runs at exit, iptables, tc, bpftool, get no more). Irreversible."""
    libc = _libc()
    _bound(libc, keep)
    _set_capabilities(keep)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def die_with(parent: int) -> None:
    """This process must not outlive `parent` (a worker its supervisor: it would hold the port and the
    queue): killed when it dies, or exits now if it died already."""
    _check(_libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "PR_SET_PDEATHSIG")
    if os.getppid() != parent:        # it died before prctl() took effect: nobody would kill us
        os._exit(1)


def drop(user: str, keep: tuple[str, ...], die_with_parent: bool = True) -> None:
    """Become `user` keeping only the capabilities `keep`; no new privileges; the seccomp filter.
    Irreversible. Raises OSError/ValueError (the worker then exits and the supervisor says why)."""
    libc = _libc()
    uid, gid = user_ids(user)
    parent = os.getppid()
    _bound(libc, keep)
    _check(libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "PR_SET_KEEPCAPS")
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _set_capabilities(keep)
    libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    _check(libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "PR_SET_KEEPCAPS")
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
    if die_with_parent:       # (changing credentials cleared it; the parent may have died since)
        die_with(parent)
    _seccomp()


def status(pid: int) -> dict:
    """What /proc says of a process's privileges: uids, capability sets (as names), NoNewPrivs, Seccomp."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    names = {v: k for k, v in CAPABILITIES.items()}

    def caps(hexmask: str) -> set[str]:
        m = int(hexmask, 16)
        return {names.get(i, f"cap{i}") for i in range(64) if m >> i & 1}
    return {"uids": [int(x) for x in out["Uid"].split()], "gids": [int(x) for x in out["Gid"].split()],
            "effective": caps(out["CapEff"]), "permitted": caps(out["CapPrm"]), "bounding": caps(out["CapBnd"]),
            "ambient": caps(out.get("CapAmb", "0")), "no_new_privs": out.get("NoNewPrivs") == "1",
            "seccomp": int(out.get("Seccomp", "0"))}
