#!/usr/bin/env bash
# A C++ compiler for the compiled CPU decoding step and prefill scan
# (megadistill/model/cpu_step.cpp, built on first use); tests/model/test_cpu_step.py fails without
# one. Idempotent: nothing to do when `c++` runs.
set -euo pipefail
if command -v "${CXX:-c++}" >/dev/null 2>&1; then
    echo "cxx_setup: $("${CXX:-c++}" --version | head -1)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo -n"
fi
export DEBIAN_FRONTEND=noninteractive
echo "cxx_setup: no C++ compiler; installing g++"
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends g++ >/dev/null
echo "cxx_setup: installed $(c++ --version | head -1)"
