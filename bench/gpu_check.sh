#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, in under 8 minutes,
#   (a) the GPU, torch, CUDA and the optional GPU packages (liger-kernel, flash-attn, triton);
#   (b) every test marked `gpu` (pytest -m gpu), each test limited to GPU_TEST_TIMEOUT seconds;
#   (c) bench/step_cost.py on the GPU (--device cuda): its table of step costs.
# Then one summary table of the three parts. Without CUDA it says why it skips and exits 0.
#
#   bash bench/gpu_check.sh            # from the repository root; PYTHON=... picks the interpreter
#
# Budget (seconds, each part under `timeout`): info 60, tests GPU_TESTS_BUDGET (240), step cost GPU_BENCH_BUDGET (150).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
TESTS_BUDGET="${GPU_TESTS_BUDGET:-240}"
BENCH_BUDGET="${GPU_BENCH_BUDGET:-150}"
PER_TEST="${GPU_TEST_TIMEOUT:-90}"
OUT="$(mktemp -d)"

if ! timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    reason="$(timeout 60 "$PY" -c "import torch; print(f'torch {torch.__version__}, CUDA build {torch.version.cuda}, torch.cuda.is_available() is False')" 2>&1 | tail -1)"
    echo "gpu_check: skipped, no usable CUDA device here ($reason)."
    exit 0
fi

echo "== (a) GPU and versions"
timeout 60 "$PY" - <<'EOF' | tee "$OUT/info.txt"
import importlib, torch
p = torch.cuda.get_device_properties(0)
print(f"gpu: {torch.cuda.get_device_name(0)} ({p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} device(s), "
      f"capability {p.major}.{p.minor}, bf16 {torch.cuda.is_bf16_supported()})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for name in ("transformers", "triton", "liger_kernel", "flash_attn"):
    try:
        m = importlib.import_module(name)
        print(f"{name}: {getattr(m, '__version__', 'installed')}")
    except Exception as err:  # an optional package: its gpu tests skip, naming it
        print(f"{name}: not importable ({type(err).__name__})")
EOF
info_rc=${PIPESTATUS[0]}

echo "== (b) pytest -m gpu (each test at most ${PER_TEST}s, all at most ${TESTS_BUDGET}s)"
# The per-test limit: pytest-timeout when installed, else faulthandler's dump of a stuck test.
if "$PY" -c "import pytest_timeout" 2>/dev/null; then per_test=(--timeout "$PER_TEST"); else
    per_test=(-o "faulthandler_timeout=$PER_TEST"); fi
timeout "$TESTS_BUDGET" "$PY" -m pytest -m gpu -q -p no:cacheprovider -rs "${per_test[@]}" tests 2>&1 | tee "$OUT/tests.txt"
tests_rc=${PIPESTATUS[0]}
tests_line="$(grep -E '(passed|failed|error|skipped|no tests ran)' "$OUT/tests.txt" | tail -1)"

echo "== (c) bench/step_cost.py --device cuda"
timeout "$BENCH_BUDGET" "$PY" bench/step_cost.py --device cuda --reps 5 2>&1 | tee "$OUT/step_cost.txt"
bench_rc=${PIPESTATUS[0]}
ce_step="$(grep -F '| ce (student only) |' "$OUT/step_cost.txt" | awk -F'|' '{print $3}' | tr -d ' ')"
kd_step="$(grep -F '| kd forward_kl, online teacher, fused |' "$OUT/step_cost.txt" | awk -F'|' '{print $3}' | tr -d ' ')"

verdict() { case "$1" in 0) echo ok ;; 124) echo "timed out" ;; *) echo "failed (exit $1)" ;; esac; }
echo
echo "== GPU check summary ($(head -1 "$OUT/info.txt"))"
echo "| part | result | detail |"
echo "|---|---|---|"
echo "| (a) GPU and versions | $(verdict "$info_rc") | $(sed -n 2p "$OUT/info.txt") |"
echo "| (b) pytest -m gpu | $(verdict "$tests_rc") | ${tests_line:-no summary line} |"
echo "| (c) step cost on the GPU | $(verdict "$bench_rc") | CE step ${ce_step:-?} s, KD forward_kl fused (online teacher) ${kd_step:-?} s (medians) |"
rm -rf "$OUT"
[ "$info_rc" = 0 ] && [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
