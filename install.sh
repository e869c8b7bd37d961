#!/usr/bin/env bash
# Installs everything Nano needs on a fresh Debian/Ubuntu machine (run as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")"

python3 -m pip install -q -r requirements.txt
