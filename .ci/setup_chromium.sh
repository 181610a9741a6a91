#!/usr/bin/env bash
# The report test (tests/integration/test_report.py) opens `matrix-hpc report`'s
# HTML in a real headless Chromium: Debian's `chromium` package (no browser
# download, no network at test time). Idempotent.
set -euo pipefail
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
browser=$(command -v chromium || command -v chromium-browser)
"$browser" --version 2>/dev/null
# A headless load of a blank page proves it starts here (as root it needs --no-sandbox).
timeout 60 "$browser" --headless --no-sandbox --disable-gpu --dump-dom about:blank >/dev/null 2>&1
echo "headless chromium works here"
