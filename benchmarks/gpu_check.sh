#!/usr/bin/env bash
# Check and time tinylm on CUDA GPUs, and print a markdown table to paste into benchmarks/RESULTS.md:
#   1. bf16 training (eager)            tinylm train --dtype bf16
#   2. bf16 training, compiled          tinylm train --dtype bf16 --compile
#   3. FSDP2 on one GPU                 torchrun --nproc_per_node 1 -m tinylm train --fsdp
#   4. CUDA-graph decoding              generate_tokens(..., compile=True): tokens/s against eager, and whether
#                                       later calls replay the recorded CUDA graph (0 new captures, 0 recompiles)
# With 2 or more GPUs (all visible ones, or NPROC), also:
#   5. sharded init of a model bigger than one GPU: weights + gradients + AdamW moments (16 bytes a parameter)
#      are 1.25x one GPU's memory; torchrun --fsdp builds it on the meta device and each GPU gets its shards;
#      trained half way, saved as DCP shards, resumed with --async-save (and on NPROC/2 GPUs when that fits)
#   6. resharding: shakespeare-char (fp32) stopped half way on NPROC GPUs and resumed on 1 GPU; the loss
#      curve must match the run left alone; `consolidate` + `generate` on a checkpoint the NPROC GPUs wrote
#   7. checkpoint save time and host memory: benchmarks/bench_checkpoint.py --device cuda (rank 0 gathering
#      everything, as before, against DCP, synchronous and --async-save)
#
#   bash benchmarks/gpu_check.sh              # on a machine with NVIDIA GPUs (a few minutes on one H100;
#                                             # steps 5-7 add about 10 minutes on 8)
#   bash benchmarks/gpu_check.sh --dry-run    # anywhere: the same steps on the CPU with tiny models (steps 5-7
#                                             # with 2 CPU processes over gloo)
#
# Environment: PYTHON (default python), TINYLM_DATA_DIR (Tiny Shakespeare is downloaded when absent),
# PRESET / STEPS / BATCH to change the GPU workload (default shakespeare-char, 300 steps, batch 64),
# NPROC (GPUs for steps 5-7; default all visible), WIDTH / BIG_STEPS (the big model: default 4096 wide, 20 steps).
set -euo pipefail

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
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

# ----- several GPUs: sharded init past one GPU, DCP checkpoints, resharding, save time ----------------------
if [[ $DRY == 1 ]]; then
  NPROC=2
else
  NPROC=${NPROC:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}
fi
torchrun_n() { local n=$1; shift; OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" -m torch.distributed.run --standalone --nproc_per_node "$n" -m tinylm "$@"; }
metric() {  # run dir, python expression over `rows` (metrics.jsonl as dicts)
  "$PY" -c 'import json, sys; rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]; print(eval(sys.argv[2]))' "$1" "$2"
}
if (( NPROC < 2 )); then
  echo "| several GPUs (sharded init, DCP, resharding) | — | skipped: $NPROC GPU visible | skipped |" >> "$ROWS"
else
  echo "gpu_check: $NPROC processes: sharded init past one GPU, DCP checkpoints, resharding" >&2
  if [[ $DRY == 1 ]]; then
    GPU_GB=0 WIDTH=64 LAYERS=2 HEADS=4 BIG_STEPS=4 BLOCK=32 DTYPE=fp32
  else
    GPU_GB=$("$PY" -c 'import torch; print(round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))')
    WIDTH=${WIDTH:-4096} BIG_STEPS=${BIG_STEPS:-20} BLOCK=256 DTYPE=bf16 HEADS=$(( ${WIDTH:-4096} / 128 ))
    # 12 * width^2 parameters a layer; 16 bytes each (fp32 weights, gradients, two AdamW moments) = 1.25 GPUs
    LAYERS=$("$PY" -c "import math; print(max(2, math.ceil(1.25 * $GPU_GB * 2**30 / 16 / (12 * $WIDTH ** 2))))")
  fi
  BIG=(--preset tiny --set n_layer="$LAYERS" --set n_embd="$WIDTH" --set n_head="$HEADS" --set block_size="$BLOCK"
       --set bias=false --set dropout=0 --set eval_batches=2 --set log_interval=1 --batch-size 1
       --max-steps "$BIG_STEPS" --eval-interval "$BIG_STEPS" --dtype "$DTYPE" --grad-checkpointing --fsdp
       --device "$DEVICE" --no-progress)
  PARAMS=$("$PY" -m tinylm info --preset tiny --set n_layer="$LAYERS" --set n_embd="$WIDTH" --set n_head="$HEADS" \
           --set block_size="$BLOCK" --set bias=false --vocab-size 65 --json | tail -n 1 | json_field parameters)
  NEED_GB=$("$PY" -c "print(round($PARAMS * 16 / 2**30, 1))")
  HALF=$(( BIG_STEPS / 2 ))
  log="$WORK/big.log"
  if torchrun_n "$NPROC" train --data "$WORK/data" "${BIG[@]}" --out "$WORK/big" --stop-after "$HALF" > "$log" 2>&1 \
     && [[ -f "$WORK/big/checkpoints/last/.metadata" ]]; then
    peak=$(metric "$WORK/big" 'round(max(r.get("max_mem_gb", 0) for r in rows if r["type"] == "train"), 1)')
    if [[ $DRY == 1 ]]; then
      memory="dry run: no GPU memory to exceed" result=ok
    elif "$PY" -c "import sys; sys.exit(0 if $peak < $GPU_GB else 1)"; then
      memory="peak $peak GB allocated per GPU" result=ok
    else
      memory="peak $peak GB allocated per GPU, over the GPU's $GPU_GB GB" result="**FAIL**"
    fi
    if [[ $DRY == 1 ]]; then what="$NPROC CPU processes"; else what="$NEED_GB GB of weights + grads + AdamW; one GPU has $GPU_GB GB; $NPROC GPUs"; fi
    printf '| sharded init + %s steps, %s params (%s) | %s tok/s | %s | %s |\n' \
      "$HALF" "$("$PY" -c "p = $PARAMS; print(f'{p / 1e9:.2f}B' if p >= 1e9 else f'{p / 1e6:.1f}M')")" "$what" \
      "$(metric "$WORK/big" 'round(sum(r["tokens_per_sec"] for r in rows if r["type"] == "train") / sum(1 for r in rows if r["type"] == "train"))')" \
      "$memory" "$result" >> "$ROWS"
    if (( NPROC >= 4 )) && [[ $DRY == 0 ]]; then  # the model fits on half the GPUs too: reshard through them
      torchrun_n $(( NPROC / 2 )) train --resume "$WORK/big" --stop-after 2 --async-save --no-progress >> "$log" 2>&1 \
        && resharded=" resumed on $(( NPROC / 2 )) GPUs for 2 steps, then" || resharded=" **resume on $(( NPROC / 2 )) GPUs failed**,"
    else
      resharded=""
    fi
    if torchrun_n "$NPROC" train --resume "$WORK/big" --async-save --no-progress --json >> "$log" 2>&1; then
      size=$(du -sh "$WORK/big/checkpoints/last" | cut -f1)
      printf '| DCP save at step %s (%s files),%s resumed on %s processes with --async-save to step %s | — | checkpoint %s on disk | %s |\n' \
        "$HALF" "$(ls "$WORK/big/checkpoints/last" | grep -c distcp)" "$resharded" "$NPROC" "$BIG_STEPS" "$size" \
        "$([[ $resharded == *FAIL* || $resharded == *failed* ]] && echo '**FAIL**' || echo ok)" >> "$ROWS"
    else
      printf '| DCP resume of the big model | — | failed: %s | **FAIL** |\n' "$(tail -n 1 "$log" | tr '|' '/')" >> "$ROWS"
    fi
  else
    printf '| sharded init of a model bigger than one GPU (%s layers x %s) | — | failed: %s | **FAIL** |\n' \
      "$LAYERS" "$WIDTH" "$(grep -m1 -E 'error|Error' "$log" | tr '|' '/' | cut -c1-200)" >> "$ROWS"
  fi
  rm -rf "$WORK/big"  # tens of GB on a real GPU machine

  # resharding, exactly: the same global batch on NPROC processes and on one
  STEPS2=$([[ $DRY == 1 ]] && echo 8 || echo 40)
  RESHARD=(--preset "$PRESET" --max-steps "$STEPS2" --eval-interval $(( STEPS2 / 2 )) --dtype fp32 --device "$DEVICE"
           --set dropout=0 --set log_interval=1 --set eval_batches=2 --no-progress)
  log="$WORK/reshard.log"
  if torchrun_n "$NPROC" train --data "$WORK/data" "${RESHARD[@]}" --batch-size 4 --fsdp --out "$WORK/straight" > "$log" 2>&1 \
     && torchrun_n "$NPROC" train --data "$WORK/data" "${RESHARD[@]}" --batch-size 4 --fsdp --out "$WORK/split" --stop-after $(( STEPS2 / 2 )) \
          --set save_interval=$(( STEPS2 / 2 )) >> "$log" 2>&1 \
     && "$PY" -m tinylm train --resume "$WORK/split" --device "$DEVICE" --no-progress >> "$log" 2>&1; then
    diff=$("$PY" - "$WORK/straight" "$WORK/split" <<'PY'
import json, sys
losses = [{r["step"]: r["loss"] for r in map(json.loads, open(d + "/metrics.jsonl")) if r["type"] == "train"} for d in sys.argv[1:]]
print(max(abs(losses[0][s] - losses[1][s]) for s in losses[0]))
PY
)
    limit=$([[ $DRY == 1 ]] && echo 2e-3 || echo 1e-2)  # GPUs: TF32 matmuls, other reduction orders
    ok=$("$PY" -c "print('ok' if $diff < $limit else '**FAIL**')")
    printf '| resharding: %s stopped at step %s on %s processes (DCP), resumed on 1 | — | loss curve within %.1e of the run left alone (limit %s) | %s |\n' \
      "$PRESET" $(( STEPS2 / 2 )) "$NPROC" "$diff" "$limit" "$ok" >> "$ROWS"
    SHARDED=$(printf 'step_%07d' $(( STEPS2 / 2 )))  # written by the NPROC processes, never again
    if "$PY" -m tinylm generate "$WORK/split" --checkpoint "$SHARDED" --prompt "ROMEO:" --max-new-tokens 20 --device "$DEVICE" --no-progress > /dev/null 2>> "$log" \
       && "$PY" -m tinylm consolidate "$WORK/split" --checkpoint "$SHARDED" > /dev/null 2>> "$log" \
       && "$PY" -m tinylm generate "$WORK/split" --checkpoint "$SHARDED" --prompt "ROMEO:" --max-new-tokens 20 --device "$DEVICE" --no-progress > /dev/null 2>> "$log"; then
      echo "| generate, consolidate, generate on a checkpoint $NPROC processes wrote | — | shards read directly, then one model.safetensors | ok |" >> "$ROWS"
    else
      printf '| consolidate + generate | — | failed: %s | **FAIL** |\n' "$(tail -n 1 "$log" | tr '|' '/')" >> "$ROWS"
    fi
  else
    printf '| resharding %s processes -> 1 | — | failed: %s | **FAIL** |\n' "$NPROC" "$(tail -n 1 "$log" | tr '|' '/')" >> "$ROWS"
  fi

  # checkpoint save time and host memory (252M parameters; a tiny model in a dry run)
  SIZE=(); [[ $DRY == 1 ]] && SIZE=(--layers 2 --width 128 --repeats 1)
  if "$PY" "$ROOT/benchmarks/bench_checkpoint.py" --device "$DEVICE" --processes "$NPROC" --cases 5,6,7 \
       --dir "$WORK/bench" "${SIZE[@]}" > "$WORK/bench.log" 2>&1; then
    "$PY" - "$WORK/bench.log" >> "$ROWS" <<'PY'
import json, sys

bench = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
for r in bench["results"]:
    print(
        f"| save, {bench['params'] / 1e6:.0f}M params: {r['case']} | — | blocks training {r['blocking_s']:.2f} s, in place "
        f"after {r['total_s']:.2f} s, peak host RSS {r['peak_mb_per_process']:,.0f} MB per process "
        f"(+{r['added_mb_per_process']:,.0f} for the save) | ok |"
    )
PY
  else
    printf '| checkpoint save benchmark | — | failed: %s | **FAIL** |\n' "$(tail -n 1 "$WORK/bench.log" | tr '|' '/')" >> "$ROWS"
  fi
fi

# ----- the table ----------------------------------------------------------------------------------------
GPU=$("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (dry run)")')
echo
echo "### gpu_check.sh — $GPU, $(date -u +%Y-%m-%d), torch $("$PY" -c 'import torch; print(torch.__version__)')"
echo
echo "Command: \`bash benchmarks/gpu_check.sh$([[ $DRY == 1 ]] && echo ' --dry-run')\` (preset $PRESET, $STEPS steps, batch $BATCH; $NPROC processes for the sharded checks)"
echo
echo "| check | throughput | detail | result |"
echo "|---|---|---|---|"
cat "$ROWS"
grep -q FAIL "$ROWS" && exit 1 || exit 0
