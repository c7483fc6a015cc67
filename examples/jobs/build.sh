#!/bin/sh
# Rebuilds the example jobs' .wasm from their C source (checked in next to it).
# Needs Debian's clang, wasi-libc, lld and libclang-rt-dev-wasm32:
#   apt-get install clang wasi-libc lld libclang-rt-dev-wasm32
set -eu
cd "$(dirname "$0")"
for src in *.c; do
    clang --target=wasm32-wasi --sysroot=/usr -O2 "$src" -o "${src%.c}.wasm"
    echo "built ${src%.c}.wasm"
done
