#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12/13 machine: installs what it needs (apt + pip),
# builds the bare-metal MTE guest, then runs pytest. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
python3 -m pip install -q --disable-pip-version-check -e ".[test]"
make -s -C backend/qemu/guest
exec python3 -m pytest -q -p no:cacheprovider "$@"
