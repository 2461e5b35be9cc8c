#!/usr/bin/env bash
# Debian's Chromium for the web-playground browser test (a downloaded browser build fails here).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
    || echo "install-browser: could not install chromium; the browser test will be skipped" >&2
else
  echo "install-browser: not root or no apt-get; install chromium yourself for the browser test" >&2
fi
