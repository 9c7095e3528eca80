#!/usr/bin/env bash
# The 4-step joint-CDM student (README, "Longer runs": the best recipe) trained on a GPU
# for a fixed wall-clock budget, then evaluated exactly, with its handover table.
# TARGET=exact (the default) fits the teacher chain's exact law (--joint-target exact: its
# tables are built before the first step); TARGET=clean draws 8 targets per input.
#
#   1. times a training step (log.jsonl's clock) at batch 32 and at $BATCH, 30 steps each;
#   2. trains for as many steps of batch $BATCH as fit $TRAIN_SECONDS (cosine decay to the
#      last of them), then `cdm distill`'s exact evaluation of the student and of the teacher at
#      64 and 256 steps;
#   3. `cdm eval --handover` of the student (which of its steps loses).
# Everything lands in $OUT/distill/ (logs, results.json, the student) and one line per
# measurement in $OUT/distill-summary.txt.
#
#   OUT=gpu-out TRAIN_SECONDS=200 bash benchmarks/gpu_distill.sh
# Environment: OUT, PYTHON (default python3), TRAIN_SECONDS (default 200), BATCH (default 512),
# LR (default 2e-3), PRECISION (default fp32: the network is tiny and launch-bound), DEVICE
# (default cuda), TARGET (exact or clean), TEACHER_STEPS (default 128), EXTRA (more
# `cdm distill` options, e.g. "--seed 1").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-./gpu-out}"
PY="${PYTHON:-python3}"
TRAIN_SECONDS="${TRAIN_SECONDS:-200}"
BATCH="${BATCH:-512}"
LR="${LR:-2e-3}"
PRECISION="${PRECISION:-fp32}"
DEVICE="${DEVICE:-cuda}"
TARGET="${TARGET:-exact}"
TEACHER_STEPS="${TEACHER_STEPS:-128}"
mkdir -p "$OUT/distill"
summary="$OUT/distill-summary.txt"
: >"$summary"

recipe=(--methods joint --student-steps 4 --latent-components 64 --mixture-weights --shared-blocks 1
        --joint-target "$TARGET" --teacher-steps "$TEACHER_STEPS" --rollout 0.5
        --lr-schedule cosine --lr "$LR" --precision "$PRECISION" --device "$DEVICE" --quiet)
# sampled targets: 8 draws per noisy input (exact targets take the whole law, and refuse --num-targets)
[ "$TARGET" = exact ] || recipe+=(--num-targets 8)
# shellcheck disable=SC2206
extra=(${EXTRA:-})

# seconds per training step between the 10th and the 30th (past start-up and the first kernels' compilation)
step_seconds() {
  "$PY" - "$1/joint-k4/log.jsonl" <<'EOF'
import json, sys
clock = {r["step"]: r["seconds"] for r in map(json.loads, open(sys.argv[1]))}
print(f"{(clock[30] - clock[10]) / 20:.4f}")
EOF
}

for batch in 32 "$BATCH"; do
  run="$OUT/distill/calibrate-b$batch"
  "$PY" -m cdm.cli distill "${recipe[@]}" "${extra[@]}" --batch-size "$batch" --steps 30 --log-every 10 \
    --teacher-nfe 1 --num-samples 64 --out "$run" >"$run.log" 2>&1
  echo "step at batch $batch: $(step_seconds "$run") s" | tee -a "$summary"
done

per_step="$(step_seconds "$OUT/distill/calibrate-b$BATCH")"
steps="$("$PY" -c "print(max(200, int($TRAIN_SECONDS / $per_step)))")"
echo "training: $steps steps of batch $BATCH (${TRAIN_SECONDS} s at $per_step s a step)" | tee -a "$summary"

run="$OUT/distill/goal"
"$PY" -m cdm.cli distill "${recipe[@]}" "${extra[@]}" --batch-size "$BATCH" --steps "$steps" --warmup 100 \
  --log-every 50 --teacher-nfe 64,256 --out "$run" 2>&1 | tee "$run.log" | tail -n 9 >>"$summary"
echo "trained in $("$PY" -c "import json; print(round([json.loads(l) for l in open('$run/joint-k4/log.jsonl')][-1]['seconds']))") s" |
  tee -a "$summary"
"$PY" -m cdm.cli eval --checkpoint "$run/student-joint-k4.safetensors" --steps 4 --handover --device "$DEVICE" \
  2>&1 | tee "$run-handover.log" >>"$summary"
