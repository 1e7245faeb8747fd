#!/usr/bin/env bash
# Installs the system packages the tests use: Debian's chromium for the web page test.
# Without root or apt the browser test skips itself with a message; nothing else needs it.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing chromium for the web page test..."
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: chromium could not be installed; the browser test will be skipped"
fi
exit 0
