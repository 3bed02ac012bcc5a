#!/usr/bin/env bash
# Set up a fresh Debian machine for sockmap: the Debian packages it needs, a .venv with the
# project installed editable with its test extra. Idempotent and quick when nothing is missing.
# Usage: scripts/bootstrap.sh [bench]   ("bench" adds the peers the benchmarks compare against)
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc: the watcher's C idle tick (sockmap/portwatch/_tick.c; bench/loadgen.c too)
# socat, dnsmasq, curl: real servers with one socket per family and a client that tries ::1
# (tests/netlab/test_e2e_family_pairs.py); socat is also a benchmark peer
need_cmds=(nft:nftables ip:iproute2 sysctl:procps gcc:gcc socat:socat dnsmasq:dnsmasq-base
           curl:curl)
# the VM tests (tests/vm, netlab.vm): qemu and a static busybox for the VM's initramfs
need_cmds+=(qemu-system-x86_64:qemu-system-x86)
if [ "${1:-}" = "bench" ]; then
  need_cmds+=(iperf3:iperf3 pasta:passt)
fi

missing=()
for pair in "${need_cmds[@]}"; do
  cmd=${pair%%:*}; pkg=${pair#*:}
  PATH="$PATH:/usr/sbin:/sbin" command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
# the C extension needs the headers of the Python the venv is made from
if ! python3 -c 'import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))' >/dev/null 2>&1; then
  missing+=(python3-dev)
fi
if ! { [ -x /bin/busybox ] && ! grep -q /ld-linux /bin/busybox; }; then
  missing+=(busybox-static)  # (a dynamic busybox would need the host's libc in the initramfs)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bootstrap: missing Debian packages: ${missing[*]}; run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

stamp=.venv/.sockmap-installed
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ sockmap/portwatch/_tick.c -nt "$stamp" ] \
   || ! ls sockmap/portwatch/_tick.*.so >/dev/null 2>&1; then
  echo "bootstrap: installing sockmap and its test extra into .venv"
  log=.venv/pip-install.log
  if ! { .venv/bin/python -m pip install -q --upgrade pip \
         && .venv/bin/python -m pip install -q -e '.[test]'; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "bootstrap: pip install failed (log above, also in $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi

# the VM the tests boot: Debian's kernel (downloaded, extracted under .cache/vm, not
# installed) and a small initramfs, each built once (netlab/vmimage.py)
if ! .venv/bin/python -m netlab.vmimage >.venv/vmimage.log 2>&1; then
  cat .venv/vmimage.log >&2
  echo "bootstrap: could not prepare the test VM's kernel and initramfs (log above)" >&2
  exit 1
fi
