#!/usr/bin/env bash
# Cortex-M toolchain for `lowbit export --target cortex-m4|cortex-m7|cortex-m33` (issue 18):
# arm-none-eabi-gcc + newlib (cross compiler, C library with semihosting) and qemu-system-arm
# (MPS2 board models), and clang (tests/test_c_firmware.py builds the runtime with it as well as gcc). Debian
# packages; needs root (or sudo) and apt. Idempotent.
# Exit 0 when the tools are there afterwards, 1 (with one line naming what is missing) otherwise.
set -uo pipefail
PKGS="gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm clang"
have() { command -v arm-none-eabi-gcc >/dev/null && command -v qemu-system-arm >/dev/null && command -v clang >/dev/null \
         && [ -n "$(find /usr/lib/arm-none-eabi -name nosys.specs 2>/dev/null | head -1)" ]; }
if have; then echo "install_mcu_tools: ok (already installed)"; exit 0; fi
if ! command -v apt-get >/dev/null; then
  echo "install_mcu_tools: apt-get not found; install $PKGS by hand" >&2; exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "install_mcu_tools: not root and no passwordless sudo; run 'sudo apt-get install $PKGS'" >&2; exit 1
  fi
fi
($SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $PKGS) >/dev/null 2>&1
if have; then echo "install_mcu_tools: ok"; exit 0; fi
echo "install_mcu_tools: apt-get install $PKGS failed" >&2
exit 1
