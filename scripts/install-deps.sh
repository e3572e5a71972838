#!/usr/bin/env bash
# Install what mtevm's tests, guest build and real-VM host need on Debian 12 or 13.
# QEMU >= 8.0 is required for correct MTE tags (7.2 stores them wrongly, see docs):
# on Debian 12 it comes from bookworm-backports on the mirror already configured
# for apt (derived from the apt sources, no host is hard-coded); on Debian 13 from main.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

. /etc/os-release
# libc6-dev-arm64-cross + linux-libc-dev-arm64-cross: the Linux guest's programs (static aarch64);
# apt, dpkg-deb, tar and xz-utils: fetching and unpacking the guest image's Debian arm64 packages.
PKGS_COMMON="gcc-aarch64-linux-gnu binutils-aarch64-linux-gnu libc6-dev-arm64-cross linux-libc-dev-arm64-cross xz-utils tmux openssh-server openssh-client librsvg2-bin gcc make python3-venv python3-dev pkg-config"
# chromium + tesseract-ocr: `mtevm serve` is tested in a real headless browser, whose screenshot is read back.
PKGS_COMMON="$PKGS_COMMON chromium tesseract-ocr tesseract-ocr-eng"
# qemu-utils: qemu-img (internal snapshots of qcow2 disks: snapshot -a/-d/-l) and qemu-io (tests).
QEMU_PKG="qemu-system-arm qemu-utils"
# libvirt for the libvirt host kind, from the same suite as QEMU: libvirt 9.0 (Debian 12 main) passes
# -no-acpi, which QEMU 10 removed, so every start would fail. libvirt-dev + pkg-config build
# libvirt-python (pip install -e '.[libvirt]', an sdist only: python3-dev for Python.h).
LIBVIRT_PKGS="libvirt-daemon libvirt-daemon-driver-qemu libvirt-daemon-system libvirt-clients libvirt-dev"

need_qemu() {
  if ! command -v qemu-system-aarch64 >/dev/null || ! command -v qemu-img >/dev/null; then return 0; fi
  v=$(qemu-system-aarch64 --version | head -1 | sed -E 's/.*version ([0-9]+)\..*/\1/')
  [ "${v:-0}" -lt 8 ]
}
need_libvirt() {
  dpkg -s libvirt-dev libvirt-daemon-driver-qemu libvirt-clients >/dev/null 2>&1 || return 0
  v=$(libvirtd --version 2>/dev/null | sed -E 's/.* ([0-9]+)\..*/\1/')
  [ "${v:-0}" -lt 10 ]
}
need_pkgs() {
  for p in $PKGS_COMMON; do dpkg -s "$p" >/dev/null 2>&1 || return 0; done
  return 1
}

if need_qemu || need_pkgs || need_libvirt; then
  if [ "${VERSION_CODENAME:-}" = "bookworm" ]; then
    # Derive the mirror from the configured bookworm suite (deb822 or one-line format).
    uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      uri=$(awk '/^URIs:/{u=$2} /^Suites:/{ if ($0 ~ /(^| )bookworm( |$)/) {print u; exit} }' "$f")
      [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
      uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    fi
    if [ -z "$uri" ]; then echo "install-deps: no bookworm apt source found to derive the mirror" >&2; exit 1; fi
    echo "deb $uri bookworm-backports main" | $SUDO tee /etc/apt/sources.list.d/mtevm-backports.list >/dev/null
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $PKGS_COMMON >/dev/null
    $SUDO apt-get install -y -qq -t bookworm-backports --no-install-recommends $QEMU_PKG $LIBVIRT_PKGS >/dev/null
  else
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends $PKGS_COMMON $QEMU_PKG $LIBVIRT_PKGS >/dev/null
  fi
fi
qemu-system-aarch64 --version | head -1
