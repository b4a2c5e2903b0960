#!/usr/bin/env bash
# Check and time tinylm on one CUDA GPU, and print a markdown table to paste into benchmarks/RESULTS.md:
#   1. bf16 training (eager)            tinylm train --dtype bf16
#   2. bf16 training, compiled          tinylm train --dtype bf16 --compile
#   3. FSDP2 on one GPU                 torchrun --nproc_per_node 1 -m tinylm train --fsdp
#   4. CUDA-graph decoding              generate_tokens(..., compile=True): tokens/s against eager, and whether
#                                       later calls replay the recorded CUDA graph (0 new captures, 0 recompiles)
#
#   bash benchmarks/gpu_check.sh              # on a machine with an NVIDIA GPU (a few minutes on an H100)
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU with a tiny model
#
# Environment: PYTHON (default python), TINYLM_DATA_DIR (Tiny Shakespeare is downloaded when absent),
# PRESET / STEPS / BATCH to change the GPU workload (default shakespeare-char, 300 steps, batch 64).
set -euo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
  *) echo "gpu_check: unknown argument $1 (use --dry-run or nothing)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PY" -c 'import torch' 2>/dev/null; then
  echo "gpu_check: $PY cannot import torch; activate the environment tinylm is installed in (or set PYTHON)." >&2
  exit 1
fi
if [[ $DRY == 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA GPU is visible to PyTorch ($("$PY" -c 'import torch; print("torch", torch.__version__, "built for CUDA", torch.version.cuda)')); run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch, or pass --dry-run to check the script on this CPU." >&2
  exit 1
fi

if [[ $DRY == 1 ]]; then
  DEVICE=cpu PRESET=tiny STEPS=4 BATCH=4 NEW=24
else
  DEVICE=cuda PRESET=${PRESET:-shakespeare-char} STEPS=${STEPS:-300} BATCH=${BATCH:-64} NEW=200
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
ROWS="$WORK/rows.md"
: > "$ROWS"

tinylm() { "$PY" -m tinylm "$@"; }
json_field() { "$PY" -c 'import json, sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])[sys.argv[1]])' "$1"; }

echo "gpu_check: preparing Tiny Shakespeare (characters) in $WORK/data" >&2
tinylm prepare shakespeare --out "$WORK/data" > /dev/null

# ----- training: eager bf16, compiled bf16, FSDP2 on one GPU ------------------------------------------
train_row() {  # name, run dir, command...
  local name=$1 out=$2; shift 2
  local log="$WORK/$(basename "$out").log" summary
  if "$@" --data "$WORK/data" --preset "$PRESET" --max-steps "$STEPS" --batch-size "$BATCH" --eval-interval "$STEPS" \
      --device "$DEVICE" --dtype bf16 --out "$out" --no-progress --json > "$log" 2>&1; then
    summary=$(tail -n 1 "$log")
    printf '| %s | %s tok/s | val loss %.4f after %s steps, %s s | ok |\n' "$name" \
      "$(json_field tokens_per_sec <<< "$summary")" "$(json_field val_loss <<< "$summary")" \
      "$(json_field steps <<< "$summary")" "$(json_field seconds <<< "$summary")" >> "$ROWS"
  else
    printf '| %s | — | failed: %s | **FAIL** |\n' "$name" "$(tail -n 1 "$log" | tr '|' '/')" >> "$ROWS"
  fi
}
echo "gpu_check: training ($PRESET, $STEPS steps, batch $BATCH, bf16)" >&2
train_row "train bf16, eager" "$WORK/eager" tinylm train
train_row "train bf16, --compile" "$WORK/compiled" tinylm train --compile
train_row "train bf16, FSDP2 (torchrun, 1 process)" "$WORK/fsdp" \
  "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 -m tinylm train --fsdp

# ----- decoding: CUDA graphs recorded once, then replayed ---------------------------------------------
echo "gpu_check: decoding (eager against compiled / CUDA graphs)" >&2
RUN="$WORK/eager"
[[ -d "$RUN/checkpoints" ]] || RUN=""
"$PY" - "$RUN" "$DEVICE" "$PRESET" "$NEW" >> "$ROWS" <<'PY' || echo "| decode | — | failed (see the error above) | **FAIL** |" >> "$ROWS"
"""Time batch-1 greedy decoding, eager and compiled, and count CUDA graph captures and dynamo compiles per call."""
import sys
import time

import torch
import torch._dynamo.utils as dynamo_utils

from tinylm.config import SampleConfig, build_configs
from tinylm.generate import generate_tokens
from tinylm.model import Transformer

run_dir, device, preset, new = sys.argv[1], torch.device(sys.argv[2]), sys.argv[3], int(sys.argv[4])
if run_dir:
    from tinylm.checkpoint import load_run

    model = load_run(run_dir, device=device).model
else:  # training failed: a fresh model of the same shape still shows the decode path
    model = Transformer(build_configs(preset, {"dropout": 0.0}, vocab_size=65)[0]).to(device).eval()
if device.type == "cuda":
    model = model.to(torch.bfloat16)
new = min(new, model.cfg.block_size - 16)
captures = 0
if device.type == "cuda":  # every CUDA graph recording goes through CUDAGraph.capture_begin
    original = torch.cuda.CUDAGraph.capture_begin

    def counting(self, *args, **kwargs):
        global captures
        captures += 1
        return original(self, *args, **kwargs)

    torch.cuda.CUDAGraph.capture_begin = counting


def compiles() -> int:
    """Graphs dynamo has compiled so far (a recompile adds one)."""
    return dynamo_utils.counters["stats"]["unique_graphs"]


def decode(compile: bool, prompt_len: int = 16, n: int = new) -> float:
    """Tokens per second of one greedy generation of n tokens."""
    prompt = torch.randint(1, model.cfg.vocab_size, (1, prompt_len), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    list(generate_tokens(model, prompt, SampleConfig(max_new_tokens=n, do_sample=False), compile=compile))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


decode(False, n=8)
eager = sorted(decode(False) for _ in range(3))[1]
t0 = time.perf_counter()
decode(True)  # first call: compiles and records
first_s = time.perf_counter() - t0
before_captures, before_compiles = captures, compiles()
graphs = sorted([decode(True), decode(True), decode(True, prompt_len=9)])[1]  # later calls, one other prompt length
new_captures, new_compiles = captures - before_captures, compiles() - before_compiles
kind = "CUDA graphs" if device.type == "cuda" else "compiled (no CUDA graphs on CPU)"
ok = new_captures == 0 and new_compiles == 0
print(f"| decode batch 1, eager ({next(model.parameters()).dtype}) | {eager:,.0f} tok/s | {new} new tokens, median of 3 | ok |")
print(
    f"| decode batch 1, {kind} | {graphs:,.0f} tok/s ({graphs / eager:.2f}x eager) | first call {first_s:.1f} s "
    f"({captures - new_captures} captures); 3 later calls: {new_captures} new captures, {new_compiles} new "
    f"dynamo compile events | {('ok (replays)' if device.type == 'cuda' else 'ok (no recompiles)') if ok else '**FAIL: re-records**'} |"
)
PY

# ----- the table ----------------------------------------------------------------------------------------
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)")')
echo
echo "### gpu_check.sh — $GPU, $(date -u +%Y-%m-%d), torch $("$PY" -c 'import torch; print(torch.__version__)')"
echo
echo "Command: \`bash benchmarks/gpu_check.sh$([[ $DRY == 1 ]] && echo ' --dry-run')\` (preset $PRESET, $STEPS steps, batch $BATCH)"
echo
echo "| check | throughput | detail | result |"
echo "|---|---|---|---|"
cat "$ROWS"
grep -q FAIL "$ROWS" && exit 1 || exit 0
