#!/usr/bin/env bash
# The prepared GPU check (issue 6): kernels vs float64 references, stage II MFU of a ~1.2B student,
# teacher vs student prefill/decode at 8K-64K. Every group has its own timeout inside a 430 s
# budget and the whole script stops within 10 minutes on one H100/H200 (60 s for the version
# lines, 470 s for the selftest). Figures: one JSON file, rewritten after every group.
# Usage: tools/gpu_check.sh [OUT_JSON] [--rehearse]
#   --rehearse: the same run on a CPU (small shapes, Triton under its interpreter, FlexAttention
#   forward only); tests/test_selftest.py runs it so the script is exercised before a GPU is lent.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_check.json}"
MODE="--gpu"
[ "${2:-}" = "--rehearse" ] && MODE="--dry-run"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
timeout 60 "$PY" - <<'PY' || true
import importlib
for mod in ("torch", "triton", "deepspeed", "transformers", "mlstm_kernels", "flash_attn"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod:14s} {getattr(m, '__version__', '?')}")
    except Exception as exc:  # report, do not stop: each check says what it lacks
        print(f"{mod:14s} unavailable ({type(exc).__name__}: {exc})")
import torch
from megadistill.model.backends import triton_backend_status
print("cuda", torch.cuda.is_available(), torch.version.cuda)
print("mlstm triton backend:", triton_backend_status("cuda") or "usable")
PY
timeout 470 "$PY" -m megadistill.cli selftest "$MODE" --budget-s 430 --out "$OUT"
rc=$?
echo "gpu_check exit code $rc (0: all pass/unavailable; 1: a check failed; 124: killed); JSON: $OUT"
exit $rc
