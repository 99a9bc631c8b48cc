"""The Fabric backend of the testbed: one machine reached over SSH, with the operations the figure
modules use on a Mininet host (topologies.testbed.LabHost has the same ones):

    host.cmd("ss -Hltn")                  output of a shell command (stdout + stderr), like Node.cmd
    host.run("ip mptcp endpoint flush")   the same, failing loudly on a non-zero exit
    p = host.popen(argv, stdout=PIPE)     a background process (pid, stdout, poll, wait, signals)
    host.write_file(path, text)           a file on the host (put); host.get(path, local) brings one back
    host.mkdtemp("haproxy")               a private run directory under the host's work directory
    host.cpu_quota("mimbox", 0.25)        a CPU box there (topologies.regimes.CpuQuota's interface)
    host.undo("ip mptcp endpoint delete id 3")   a command close() runs, last registered first

One Fabric connection per host, reused by every command; every command has a timeout and its exit
status checked (run) or returned (cmd). close() -- also after an error or Ctrl-C -- stops every
process started here (SIGTERM to its process group, then SIGKILL), runs the undo list (endpoints,
routes, sysctls, cgroups) and removes the run directories.
"""
from __future__ import annotations

import io
import os
import shlex
import signal
import subprocess
import threading
import time

from topologies.hostsfile import HostSpec
from topologies.regimes import PREFIX, CpuQuota

COMMAND_TIMEOUT = 300.0     # s: no remote command may hang the harness longer


class RemoteError(RuntimeError):
    """A remote command failed: host, command, exit status and what it printed."""


class _Sink(io.TextIOBase):
    """Where output nobody reads goes (DEVNULL)."""

    def write(self, s: str) -> int:
        return len(s)


class RemoteProcess:
    """A process started by RemoteHost.popen(): the part of subprocess.Popen the experiments use.
    `pid` is the process's pid on its host (it leads a process group and session of its own)."""

    def __init__(self, host: "RemoteHost", argv: list[str], stdout, stderr, text: bool, stdin=None):
        self.host, self.args, self.returncode = host, argv, None
        self._pipes: list = []
        self.stdout = self.stderr = self.stdin = None
        feed = False                 # invoke's in_stream: nothing (the process's stdin is closed)
        if stdin == subprocess.PIPE:     # what the caller writes to .stdin reaches the process; close() is its EOF
            r, w = os.pipe()
            feed = _Feed(r)
            self.stdin = os.fdopen(w, "w" if text else "wb", **({"buffering": 1} if text else {}))
            self._pipes.append(feed)
        elif stdin is not None and stdin != subprocess.DEVNULL:
            raise ValueError(f"unsupported stdin {stdin!r}")
        out_stream, self.stdout = self._stream(stdout, text)
        err_stream, self.stderr = self._stream(stderr, text)
        pid_r, pid_w = os.pipe()
        pid_reader = os.fdopen(pid_r, "r")
        pid_stream = os.fdopen(pid_w, "w", buffering=1)
        # the pid comes first on stderr, on a pipe of its own; then the process's own stderr
        self._pid_stream, self._err_stream = pid_stream, err_stream
        splitter = _PidSplitter(pid_stream, err_stream)
        cmd = ("exec setsid -w sh -c 'echo mimbox-pid:$$ >&2; exec \"$@\"' sh "
               + " ".join(shlex.quote(a) for a in argv))
        self._promise = host.conn.run(host.wrap(cmd), asynchronous=True, hide=True, warn=True, in_stream=feed,
                                      out_stream=out_stream, err_stream=splitter, pty=False)
        line = _readline_timeout(pid_reader, 30.0)
        pid_reader.close()
        if not line.startswith("mimbox-pid:"):
            self._finish()
            raise RemoteError(f"{host.name}: {argv[0]} did not start: {line.strip() or 'no pid'}")
        self.pid = int(line.split(":", 1)[1])
        host.processes.append(self)

    def _stream(self, how, text: bool):
        """(what invoke writes to, what the caller reads) for subprocess.PIPE / DEVNULL / a file."""
        if how == subprocess.PIPE:
            r, w = os.pipe()
            writer = os.fdopen(w, "w", buffering=1, encoding="utf-8", errors="replace")
            reader = os.fdopen(r, "r" if text else "rb")
            self._pipes.append(writer)
            return writer, reader
        if how is None or how == subprocess.DEVNULL:
            return _Sink(), None
        if hasattr(how, "fileno"):          # a local file (a system's log): appended to as it comes
            writer = os.fdopen(os.dup(how.fileno()), "a", buffering=1, encoding="utf-8", errors="replace")
            self._pipes.append(writer)
            return writer, None
        raise ValueError(f"unsupported stream {how!r}")

    def _finish(self) -> None:
        result = self._promise.join()
        self.returncode = result.exited if result.exited is not None else -1
        for w in self._pipes + [self._pid_stream]:
            try:
                w.close()
            except (OSError, ValueError):
                pass                             # closed already
        self._pipes = []

    def poll(self) -> int | None:
        """The exit status, or None while it runs."""
        if self.returncode is None and self._promise.runner.process_is_finished:
            self._finish()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """`sig` to the process's whole group on its host."""
        if self.poll() is None:
            self.host.cmd(f"kill -{int(sig)} -- -{self.pid} 2>/dev/null")

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        self.wait(timeout)
        out = self.stdout.read() if self.stdout else None
        err = self.stderr.read() if self.stderr else None
        return out, err


class _Feed:
    """invoke's in_stream from the read end of a pipe: whatever is there at once (invoke reads a
    non-terminal stream a byte per 10 ms otherwise); empty at EOF, which closes the process's stdin."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def isatty(self) -> bool:
        return False

    def read(self, _n: int = -1) -> str:
        return os.read(self.fd, 65536).decode(errors="replace")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _PidSplitter(io.TextIOBase):
    """invoke's err_stream: the first line (mimbox-pid:N) to one stream, the rest to the other."""

    def __init__(self, pid_stream, rest):
        self.pid_stream, self.rest, self.buf, self.done = pid_stream, rest, "", False

    def write(self, s: str) -> int:
        if self.done:
            return self.rest.write(s) or len(s)
        self.buf += s
        if "\n" in self.buf:
            first, rest = self.buf.split("\n", 1)
            self.pid_stream.write(first + "\n")
            self.done = True
            if rest:
                self.rest.write(rest)
        return len(s)

    def flush(self) -> None:
        for s in (self.pid_stream, self.rest):
            try:
                s.flush()
            except (OSError, ValueError):
                pass                             # its reader closed it


def _readline_timeout(f, timeout: float) -> str:
    import select
    r, _, _ = select.select([f], [], [], timeout)
    return f.readline() if r else ""


class RemoteHost:
    """One machine of a remote testbed, reached over SSH (Fabric)."""

    remote = True

    def __init__(self, spec: HostSpec, connect_timeout: float = 10.0):
        from fabric import Connection
        self.spec, self.name = spec, spec.role
        kwargs = {"look_for_keys": spec.key is None, "allow_agent": spec.key is None}
        if spec.key:
            kwargs["key_filename"] = spec.key
        self.conn = Connection(spec.address, user=spec.user, port=spec.port, connect_timeout=connect_timeout,
                               connect_kwargs=kwargs)
        if not spec.known_hosts:
            import paramiko
            self.conn.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        self.processes: list[RemoteProcess] = []
        self._undo: list[str] = []
        self._lock = threading.Lock()
        self.workdir = spec.workdir
        self.python = f"{spec.workdir}/venv/bin/python"     # the venv the installer makes (topologies.lab)
        self.src = f"{spec.workdir}/src"                     # experiments/ and topologies/ of this checkout
        self.mptcpize = ""                                   # the wheel's shim, set after install
        self._tmp = 0

    def __repr__(self) -> str:
        return f"{self.name}({self.spec.target})"

    def connect(self) -> None:
        """Open the SSH connection now (a refused host fails here, not in the middle of a run)."""
        self.conn.open()
        self.conn.transport.set_keepalive(30)     # an hour-long figure must not lose an idle connection

    def wrap(self, cmd: str) -> str:
        """A command as the host runs it: through sudo if the user is not root, in the checkout's
        source directory with its experiments importable."""
        env = f"cd {shlex.quote(self.workdir)} 2>/dev/null; export PYTHONPATH={shlex.quote(self.src)}; "
        full = env + cmd
        return f"sudo -n sh -c {shlex.quote(full)}" if self.spec.sudo else full

    # -- commands --------------------------------------------------------------------------------
    def cmd(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a shell command; its stdout and stderr (Mininet's Node.cmd does the same)."""
        r = self.conn.run(self.wrap(command), hide=True, warn=True, in_stream=False, timeout=timeout, pty=False)
        return r.stdout + r.stderr

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a shell command that must succeed; its stdout."""
        r = self.conn.run(self.wrap(command), hide=True, warn=True, in_stream=False, timeout=timeout, pty=False)
        if r.exited != 0:
            raise RemoteError(f"{self.name} ({self.spec.address}): `{command}` exited {r.exited}: "
                              f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout

    def probe(self, commands: dict[str, str]) -> dict[str, str]:
        """Several read-only commands in one round trip: {name: its output (stdout and stderr), stripped}."""
        out = self.cmd("; ".join(f"echo @@mimbox-probe@@; {c} 2>&1" for c in commands.values()))
        return {k: v.strip() for k, v in zip(commands, out.split("@@mimbox-probe@@\n")[1:])}

    def popen(self, argv: list[str], stdout=subprocess.PIPE, stderr=None, text: bool = False, stdin=None,
              **_) -> RemoteProcess:
        """Start a background process; its stdout/stderr: subprocess.PIPE, DEVNULL, or a local file;
        its stdin: none, or subprocess.PIPE (closing .stdin closes the process's)."""
        return RemoteProcess(self, [str(a) for a in argv], stdout, stderr, text, stdin)

    def undo(self, command: str) -> None:
        """Register a command that close() runs (last registered, first run)."""
        self._undo.append(command)

    # -- files -----------------------------------------------------------------------------------
    def write_file(self, path: str, data: str | bytes, mode: int = 0o644) -> None:
        """Write a file on the host."""
        blob = data.encode() if isinstance(data, str) else data
        self.conn.put(io.BytesIO(blob), path)
        self.conn.sftp().chmod(path, mode)

    def put(self, local: str, remote: str) -> None:
        """Copy a local file to the host."""
        self.conn.put(local, remote)

    def get(self, remote: str, local: str) -> str:
        """Copy a file of the host here; returns the local path."""
        self.conn.get(remote, local)
        return local

    def mkdtemp(self, tag: str) -> str:
        """A fresh directory under the work directory's run/, removed by close()."""
        with self._lock:
            self._tmp += 1
            n = self._tmp
        path = f"{self.workdir}/run/{tag}-{os.getpid()}-{n}"
        self.run(f"mkdir -p {shlex.quote(path)} && chmod 755 {shlex.quote(self.workdir)}/run {shlex.quote(path)}")
        return path

    # -- measurement -----------------------------------------------------------------------------
    def cpu_quota(self, name: str, cores: float | None):
        """A CPU box on this host (created)."""
        return RemoteCpuQuota(self, name, cores).create()

    def stats(self, path: str) -> dict:
        """A converter's statistics socket on this host, read there (`mimbox stats --path`)."""
        import json
        out = self.run(f"{self.python} -m mimbox.ops.cli stats --path {shlex.quote(path)}", timeout=30)
        return json.loads(out)

    def cpu_ticks(self) -> tuple[int, int]:
        """(steal, all) CPU ticks of this host (topologies.regimes.cpu_ticks, read there)."""
        from topologies.regimes import cpu_ticks
        return cpu_ticks(self.run("head -1 /proc/stat", timeout=30))

    # -- tear-down -------------------------------------------------------------------------------
    def stop_processes(self, grace: float = 10.0) -> None:
        """SIGTERM to every process started here (its group), SIGKILL to what is left after `grace`."""
        live = [p for p in self.processes if p.poll() is None]
        if live:
            self.cmd("kill -TERM -- " + " ".join(f"-{p.pid}" for p in live) + " 2>/dev/null")
        deadline = time.monotonic() + grace
        for p in live:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    pass                  # reported by the leftover check (lab.leftovers)
        self.processes = [p for p in self.processes if p.returncode is None]

    def close(self) -> None:
        """Stop every process, run the undo list, remove the run directories, close the connection."""
        try:
            self.stop_processes()
            while self._undo:
                self.cmd(self._undo.pop())
            self.cmd(f"rm -rf {shlex.quote(self.workdir)}/run")
        finally:
            self.conn.close()


class RemoteCpuQuota(CpuQuota):
    """topologies.regimes.CpuQuota on a remote host: the same cgroup files, written there. A process
    joins its group itself before it execs (wrap), so nothing runs a moment outside the quota."""

    def __init__(self, host: RemoteHost, name: str, cores: float | None, period_us: int = 100_000):
        super().__init__(name, cores, period_us)            # checks cores, names the group, sets the quota
        self.host, self.name = host, self.name.replace(PREFIX, f"{PREFIX}r", 1)   # r: made on a remote host

    def create(self) -> "RemoteCpuQuota":
        from topologies.regimes import QuotaUnavailable
        v2 = self.host.cmd("grep -qw cpu /sys/fs/cgroup/cgroup.controllers 2>/dev/null && "
                           "grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control && echo v2").strip()
        if v2 == "v2":
            self.version, self.dirs = 2, [f"/sys/fs/cgroup/{self.name}"]
        elif self.host.cmd("test -f /sys/fs/cgroup/cpu/cpu.cfs_quota_us && echo v1").strip() == "v1":
            self.version = 1
            self.dirs = [f"/sys/fs/cgroup/cpu/{self.name}"]
            if self.host.cmd("test -d /sys/fs/cgroup/cpuacct && ! test /sys/fs/cgroup/cpuacct -ef "
                             "/sys/fs/cgroup/cpu && echo apart").strip() == "apart":
                self.dirs.append(f"/sys/fs/cgroup/cpuacct/{self.name}")
        else:
            raise QuotaUnavailable(f"{self.host.name}: no cgroup cpu controller (v2 cpu.max or v1 cpu.cfs_quota_us)")
        self.host.run("mkdir " + " ".join(self.dirs))
        self.host.undo("rmdir " + " ".join(self.dirs) + " 2>/dev/null")
        self._write_quota()
        return self

    def _write_quota(self) -> None:
        if self.version == 2:
            self.host.run(f"echo '{'max' if self.quota_us < 0 else self.quota_us} {self.period_us}' "
                          f"> {self.dirs[0]}/cpu.max")
        else:
            self.host.run(f"echo {self.period_us} > {self.dirs[0]}/cpu.cfs_period_us && "
                          f"echo {self.quota_us} > {self.dirs[0]}/cpu.cfs_quota_us")

    def set_cores(self, cores: float) -> None:
        if cores <= 0:
            raise ValueError(f"a CPU quota needs cores > 0, not {cores}")
        self.cores, self.quota_us = cores, max(1000, int(cores * self.period_us))
        self._write_quota()

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` joining the group(s) first, then exec'ing."""
        join = "; ".join(f"echo $$ > {d}/cgroup.procs" for d in self.dirs)
        return ["sh", "-c", f'{join} && exec "$@"', "sh", *argv]

    def admit(self, pid: int, timeout: float = 10.0) -> None:
        """Nothing to do: wrap() joins at exec."""

    def pids(self) -> list[int]:
        return [int(x) for x in self.host.cmd(f"cat {self.dirs[0]}/cgroup.procs 2>/dev/null").split()]

    def usage_s(self) -> float:
        if self.version == 2:
            for line in self.host.run(f"cat {self.dirs[0]}/cpu.stat").splitlines():
                if line.startswith("usage_usec"):
                    return int(line.split()[1]) / 1e6
        return int(self.host.run(f"cat {self.dirs[-1]}/cpuacct.usage")) / 1e9

    def remove(self) -> None:
        """Remove the group(s) once their processes are gone (close() retries)."""
        self.host.cmd("rmdir " + " ".join(self.dirs) + " 2>/dev/null")
