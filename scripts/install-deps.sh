#!/usr/bin/env bash
# Install every Debian package that pgmap's build, tests, benchmarks and plots need.
# Idempotent: when everything is present it only runs dpkg-query and exits in well under a second.
set -euo pipefail

packages=(
  build-essential cmake ninja-build pkg-config git
  g++ libasan8 libtsan2 libubsan1
  libgtest-dev libgmock-dev libbenchmark-dev
  liburcu-dev libcli11-dev nlohmann-json3-dev libfmt-dev
  gnuplot-nox clang-format
  spin
  clang libclang-rt-14-dev
)

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$p")
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#packages[@]} packages present"
  exit 0
fi

echo "install-deps: missing: ${missing[*]}"
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=sudo
  else
    echo "install-deps: not root and no password-less sudo; run as root or install: ${missing[*]}" >&2
    exit 1
  fi
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: installed ${missing[*]}"
