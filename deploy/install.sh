#!/usr/bin/env bash
# Installs the node into ./.venv: Debian packages (Orthanc, dcmtk, dicom3tools), PyTorch's CPU build
# first (a looser torch requirement would pull several GB of CUDA packages), then the node itself.
#   bash deploy/install.sh          the node
#   bash deploy/install.sh --test   the node, TensorFlow for Keras models, and the test tools
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[ "${1:-}" = "--test" ] && extras="[tensorflow,distributed,test]"

packages="orthanc dcmtk dicom3tools"
# --test: Node.js for tests/ohif, which opens SR and SEG objects with the npm libraries OHIF 3.13 uses
[ "${1:-}" = "--test" ] && ! command -v node >/dev/null && packages="$packages nodejs npm"
# --test: Chromium for tests/test_browser.py, driven by Playwright through its executable_path (no browser
# download), and a CJK font so that its screenshots show Korean and Japanese patient names, not boxes
[ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null && packages="$packages chromium"
[ "${1:-}" = "--test" ] && packages="$packages fonts-wqy-zenhei"
# --test: the TLS tests make their own CA and certificates with the openssl command
[ "${1:-}" = "--test" ] && packages="$packages openssl"
missing=""
for p in $packages; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
fi

python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".${extras}"
[ "${1:-}" = "--test" ] && npm ci --prefix tests/ohif --no-audit --no-fund --loglevel=error >/dev/null
echo "installed: $(.venv/bin/ainode --help | head -1)"
