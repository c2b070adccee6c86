#!/usr/bin/env bash
# Installs pgmap from an existing build tree into a scratch prefix, then builds and runs the
# consumer (consumer.cc) in every form an outside project would use:
#   1. CMake find_package(pgmap): pgmap::pgmap (libpgmap.so) and pgmap::pgmap_static (libpgmap.a)
#   2. pkg-config --cflags --libs pgmap             (the plain form: libpgmap.so)
#   3. pkg-config --cflags --libs --static pgmap    (as given, and with libpgmap.a forced)
# and checks that the installed package names no directory of the source tree (src/ is private)
# and that the shared library has a SONAME.
set -euo pipefail
build=${1:?usage: run.sh BUILD_DIR}
here=$(cd "$(dirname "$0")" && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
prefix="$scratch/prefix"
fail() { echo "install-test: $*" >&2; exit 1; }

cmake --install "$build" --prefix "$prefix" >/dev/null
pcfile=$(find "$prefix" -name pgmap.pc | head -1)
[[ -n "$pcfile" ]] || fail "no pgmap.pc installed"
pcdir=$(dirname "$pcfile")
libdir=$(dirname "$pcdir")
so=$(find "$libdir" -maxdepth 1 -name 'libpgmap.so.*' -type f | head -1)
[[ -n "$so" ]] || fail "no libpgmap.so installed"
soname=$(readelf -d "$so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[[ -n "$soname" && -e "$libdir/$soname" ]] || fail "libpgmap.so has no SONAME or no link for it"
[[ -f "$libdir/libpgmap.a" ]] || fail "no libpgmap.a installed"
src=$(cd "$here/../.." && pwd)
if grep -rl -- "$src" "$prefix/$(basename "$libdir")/cmake" "$pcdir" >/dev/null; then
  fail "the installed package names the source tree ($src): src/ must stay private"
fi

# Runs a built consumer and checks it does (or does not) load libpgmap.so.
run() {  # run NAME BINARY shared|static
  local name=$1 bin=$2 want=$3 needs=no
  readelf -d "$bin" | grep -q "NEEDED.*\[$soname\]" && needs=yes
  if [[ $want == shared && $needs == no ]]; then fail "$name: does not load $soname"; fi
  if [[ $want == static && $needs == yes ]]; then fail "$name: loads $soname, wanted libpgmap.a"; fi
  echo "== $name ($want)"
  LD_LIBRARY_PATH="$libdir" "$bin" || fail "$name: consumer failed"
}

# 1. find_package
cmake -S "$here" -B "$scratch/build" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" >/dev/null
cmake --build "$scratch/build" >/dev/null
run "find_package pgmap::pgmap" "$scratch/build/consumer" shared
run "find_package pgmap::pgmap_static" "$scratch/build/consumer_static" static

# 2. and 3. pkg-config
export PKG_CONFIG_PATH="$pcdir"
# shellcheck disable=SC2046  # word splitting of pkg-config's output is intended
g++ -o "$scratch/consumer-pc" "$here/consumer.cc" $(pkg-config --cflags --libs pgmap)
run "pkg-config --cflags --libs pgmap" "$scratch/consumer-pc" shared
# shellcheck disable=SC2046
g++ -o "$scratch/consumer-pc-static" "$here/consumer.cc" $(pkg-config --cflags --libs --static pgmap)
run "pkg-config --static, as given" "$scratch/consumer-pc-static" shared
# shellcheck disable=SC2046
g++ -o "$scratch/consumer-pc-archive" "$here/consumer.cc" $(pkg-config --cflags pgmap) \
  -Wl,--as-needed -L"$libdir" -Wl,-Bstatic -lpgmap -Wl,-Bdynamic $(pkg-config --libs --static pgmap)
run "pkg-config --static with libpgmap.a" "$scratch/consumer-pc-archive" static
echo "install-test: find_package (shared, static) and pkg-config (plain, --static, archive)" \
  "consumers built and ran; $soname"
