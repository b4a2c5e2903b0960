#!/usr/bin/env bash
# Soak test for multi-process training on CPU: RUNS consecutive 2-process torchrun runs (gloo) for each of
# DDP, FSDP2 (sharded DCP checkpoints) and FSDP2 with --async-save, each a tiny `tiny`-preset run of a few
# steps; counts the runs that exit 0, the ones whose output shows an abort ("terminate called ..."), and
# (FSDP2) the ones whose `last` is not a complete sharded checkpoint. Exits non-zero unless every run passed.
#   usage: benchmarks/torchrun_soak.sh [RUNS=20] [TEXT=$TINYLM_DATA_DIR/tinyshakespeare/input.txt]
set -u
RUNS=${1:-20}
TEXT=${2:-${TINYLM_DATA_DIR:-data}/tinyshakespeare/input.txt}
PY=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS=1
head -c 100000 "$TEXT" > "$WORK/slice.txt"
"$PY" -m tinylm prepare "$WORK/slice.txt" --out "$WORK/data" --tokenizer char > /dev/null || exit 1
failed=0
for mode in ddp fsdp fsdp-async; do
  ok=0 aborts=0
  case $mode in
    ddp) flags=() ;;
    fsdp) flags=(--fsdp) ;;
    fsdp-async) flags=(--fsdp --async-save) ;;
  esac
  for i in $(seq 1 "$RUNS"); do
    out="$WORK/run-$mode-$i"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 -m tinylm train --data "$WORK/data" \
      --preset tiny --max-steps 4 --eval-interval 2 --set eval_batches=2 --device cpu --no-progress \
      --out "$out" "${flags[@]}" > "$WORK/log" 2>&1
    rc=$?
    grep -q "terminate called" "$WORK/log" && aborts=$((aborts + 1))
    if [ "$mode" != ddp ] && [ $rc -eq 0 ] && ! [ -f "$out/checkpoints/last/.metadata" ]; then
      rc=99; echo "$mode run $i: no complete sharded checkpoint"
    fi
    if [ $rc -eq 0 ]; then ok=$((ok + 1)); else echo "$mode run $i: exit $rc"; tail -5 "$WORK/log"; fi
    rm -rf "$out"
  done
  echo "$mode: $ok of $RUNS runs exited 0; $aborts aborted"
  [ $ok -eq "$RUNS" ] && [ $aborts -eq 0 ] || failed=1
done
exit $failed
