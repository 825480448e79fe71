#!/usr/bin/env bash
# Installs the C/C++ library: PREFIX/lib/librlx.{so,a}, PREFIX/include/rlx.{h,hpp}, a CMake
# package (PREFIX/lib/cmake/rlx: find_package(rlx) → rlx::rlx, rlx::rlx_static) and a
# pkg-config file (PREFIX/lib/pkgconfig/rlx.pc).
#
#   scripts/install_c.sh PREFIX            builds the release library first
#   scripts/install_c.sh PREFIX LIBDIR     installs librlx.* already built in LIBDIR (tests)
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${1:?usage: scripts/install_c.sh PREFIX [LIBDIR]}
LIBDIR=${2:-}
if [ -z "$LIBDIR" ]; then
    cargo build --release -p rlx-ffi
    LIBDIR=target/release
fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MAJOR=${VERSION%%.*}
MINOR=$(echo "$VERSION" | cut -d. -f2)
# What a Rust static library needs from the system on Linux (`rustc --print native-static-libs`).
STATIC_LIBS="gcc_s;util;rt;pthread;m;dl;c"
STATIC_FLAGS="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

mkdir -p "$PREFIX/lib/cmake/rlx" "$PREFIX/lib/pkgconfig" "$PREFIX/include"
PREFIX=$(cd "$PREFIX" && pwd)
install -m 755 "$LIBDIR/librlx.so" "$PREFIX/lib/librlx.so"
install -m 644 "$LIBDIR/librlx.a" "$PREFIX/lib/librlx.a"
install -m 644 include/rlx.h include/rlx.hpp "$PREFIX/include/"
subst() {
    sed -e "s|@VERSION@|$VERSION|g" -e "s|@MAJOR@|$MAJOR|g" -e "s|@MINOR@|$MINOR|g" \
        -e "s|@PREFIX@|$PREFIX|g" -e "s|@STATIC_LIBS@|$STATIC_LIBS|g" \
        -e "s|@STATIC_FLAGS@|$STATIC_FLAGS|g" "$1" > "$2"
}
subst ffi/pkg/rlxConfig.cmake.in "$PREFIX/lib/cmake/rlx/rlxConfig.cmake"
subst ffi/pkg/rlxConfigVersion.cmake.in "$PREFIX/lib/cmake/rlx/rlxConfigVersion.cmake"
subst ffi/pkg/rlx.pc.in "$PREFIX/lib/pkgconfig/rlx.pc"
echo "installed rlx $VERSION into $PREFIX"
