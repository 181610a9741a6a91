#!/usr/bin/env bash
# Sandbox tests need real bubblewrap (Debian's package) and util-linux's
# prlimit/setpriv; then a probe proves namespaces work here. Idempotent.
set -euo pipefail
need=()
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v prlimit >/dev/null || need+=(util-linux)
command -v setpriv >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
bwrap --version
# Root runs bwrap privileged and drops to an unprivileged uid inside (see
# matrix_hpc/services/sandbox/limits.py); other users need user namespaces.
if [ "$(id -u)" = 0 ]; then
  bwrap --ro-bind / / --proc /proc --unshare-pid --unshare-net --die-with-parent -- \
    setpriv --reuid=65534 --regid=65534 --clear-groups true
else
  bwrap --ro-bind / / --unshare-all --unshare-user --die-with-parent true
fi
echo "bubblewrap sandboxes work here"
