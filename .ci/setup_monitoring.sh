#!/usr/bin/env bash
# Monitoring tests need a real Prometheus server (Debian's package). Only the
# binary is used: matrix_hpc starts its own instance per run/cluster with a
# config it writes, so the packaged system service is kept from running
# (no policy-rc.d start, and stopped/disabled if a previous install started it).
# Idempotent.
set -euo pipefail
if ! command -v prometheus >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # policy-rc.d exit 101: dpkg must not start the system prometheus service
  # (it would listen on 0.0.0.0:9090, a port and an address we do not want).
  policy=/usr/sbin/policy-rc.d
  created=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; created=1; fi
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  [ "$created" = 1 ] && rm -f "$policy"
fi
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
prometheus --version 2>&1 | head -1
