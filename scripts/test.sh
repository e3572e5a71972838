#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12/13 machine: installs what it needs (apt packages,
# then the Python package and its test extras into ./.venv), builds the bare-metal MTE guest,
# builds the Linux guest image, then runs pytest. `.ci/run` calls exactly this. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test,libvirt]"
export PATH="$PWD/.venv/bin:$PATH" VIRTUAL_ENV="$PWD/.venv"
make -s -C backend/qemu/guest
# The Linux MTE guest image (pinned Debian arm64 packages + mtevm's guest programs) into the cache
# dir; seconds when it is up to date. The Linux guest tests boot it.
.venv/bin/python -m backend.cli image build linux
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
