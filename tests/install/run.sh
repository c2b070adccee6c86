#!/usr/bin/env bash
# Installs pgmap from an existing build tree into a scratch prefix, then builds and runs the
# consumer project against it with CMake (find_package) and with pkg-config.
set -euo pipefail
build=${1:?usage: run.sh BUILD_DIR}
here=$(cd "$(dirname "$0")" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cmake --install "$build" --prefix "$scratch/prefix" >/dev/null
cmake -S "$here" -B "$scratch/build" -G Ninja -DCMAKE_PREFIX_PATH="$scratch/prefix" >/dev/null
cmake --build "$scratch/build" >/dev/null
"$scratch/build/consumer"
pcdir=$(dirname "$(find "$scratch/prefix" -name pgmap.pc | head -1)")
PKG_CONFIG_PATH="$pcdir" g++ -o "$scratch/consumer-pc" "$here/consumer.cc" \
  $(PKG_CONFIG_PATH="$pcdir" pkg-config --cflags --libs --static pgmap)
"$scratch/consumer-pc"
echo "install-test: find_package and pkg-config consumers built and ran"
