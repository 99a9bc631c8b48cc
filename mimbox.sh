#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine (run as root):
#   ./mimbox.sh reproduce --quick     every figure, quick mode, into results/
#   ./mimbox.sh test                  the test suite
#   ./mimbox.sh <any invoke task>     see ./mimbox.sh --list
# It installs what is missing (idempotent), then runs `invoke <task>` in the project's venv.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

# Debian packages, by name. mininet is Debian's 2.3.0 (with mnexec), not PyPI's.
APT_PACKAGES=(mininet iproute2 iptables nftables libnetfilter-queue-dev tcpdump iperf3 wrk haproxy squid
              nginx-light libnginx-mod-stream clang llvm bpftool libbpf-dev python3-venv python3-dev gcc make ethtool
              iputils-ping curl procps psmisc bpftrace linux-perf strace
              libseccomp-dev python3-seccomp libcap-dev libclang-rt-14-dev socat mptcpize liburing-dev
              openssh-server)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "mimbox.sh: installing Debian packages: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # Debian starts a service when its package is installed; the experiments start their own copies.
  # Only a service whose package was installed just now is stopped (by its unit, else its pid file):
  # never a process by name, never a service this machine had before.
  declare -A pidfile=([nginx-light]=/run/nginx.pid [squid]=/run/squid.pid [haproxy]=/run/haproxy.pid
                      [openssh-server]=/run/sshd.pid)
  declare -A unit=([nginx-light]=nginx [squid]=squid [haproxy]=haproxy [openssh-server]=ssh)
  for p in "${missing[@]}"; do
    [ -n "${unit[$p]:-}" ] || continue
    svc=${unit[$p]} pf=${pidfile[$p]}
    if { [ -f "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null; } || systemctl is-active -q "$svc" 2>/dev/null; then
      echo "mimbox.sh: stopping the $svc service that installing $p started (experiments run their own)" >&2
      systemctl stop "$svc" 2>/dev/null || service "$svc" stop >/dev/null 2>&1 || true
      if [ -f "$pf" ] && kill -0 "$(cat "$pf")" 2>/dev/null; then kill "$(cat "$pf")"; fi
    fi
    # sshd is for the SSH rig's namespaces only (tests/test_remote.py): not a login service of this machine
    if [ "$p" = openssh-server ]; then systemctl disable -q ssh 2>/dev/null || true; fi
  done
fi

# The converter's workers drop to this system user after set-up (mimbox run --user, mimbox.host.privileges).
if ! id -u mimbox >/dev/null 2>&1; then
  echo "mimbox.sh: creating the system user mimbox (the converter's workers run as it)" >&2
  useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin mimbox
fi

# The venv uses Debian's python3 with --system-site-packages so that Debian's mininet is importable.
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
  # the testbed (topologies/, experiments/) is not in the wheel: importable here from the checkout
  .venv/bin/python -c 'import site, sys; open(site.getsitepackages()[0] + "/mimbox-testbed.pth", "w").write(sys.argv[1] + "\n")' "$PWD"
  rm -f .venv/.installed-*; touch "$stamp"
fi

export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/invoke "$@"
