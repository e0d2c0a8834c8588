#!/usr/bin/env bash
# Make a headless Chromium available for the status-page browser test.
# Prints the browser's path and exits 0 when one is (or now is) installed;
# exits 1 when none is found and it cannot be installed (not root, no apt-get,
# or apt failed, e.g. offline). Installing is quiet and non-interactive.
set -u

find_chromium() {
    for name in chromium chromium-browser google-chrome-stable google-chrome; do
        if path=$(command -v "$name" 2>/dev/null); then
            echo "$path"
            return 0
        fi
    done
    return 1
}

if find_chromium; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "chromium is missing and installing it needs root" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "chromium is missing and apt-get is not available" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# (A failed update may still leave usable package lists; the install says whether it worked.)
# Concurrent callers (parallel test sessions) wait on dpkg's own lock.
apt-get -qq -o DPkg::Lock::Timeout=600 update >/dev/null 2>&1
if ! apt-get -qq -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
        chromium fonts-dejavu-core >/dev/null 2>&1; then
    echo "apt-get install chromium failed (offline, or no such package here)" >&2
    exit 1
fi
find_chromium || { echo "chromium installed but not on PATH" >&2; exit 1; }
