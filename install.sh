#!/usr/bin/env bash
# Installs everything Nano needs on a fresh Debian/Ubuntu machine (run as root or with sudo):
# Python packages, a C compiler for infer_c/, and Emscripten + Chromium for the browser page.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

missing=()
command -v make >/dev/null || missing+=(make)
command -v gcc >/dev/null || missing+=(gcc)
command -v emcc >/dev/null || missing+=(emscripten)
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q -r requirements.txt
# Emscripten's JS optimizer needs acorn; the browser build keeps it in infer/.npm
make -s -C infer deps
make -s -C infer_c
