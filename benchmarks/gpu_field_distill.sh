#!/usr/bin/env bash
# Distil a SEDD-small-shaped teacher (a local SEDD, MDLM or DUO checkpoint directory) into a
# few-step joint-CDM student on a pre-tokenized .bin corpus, on 1 or 8 GPUs (torchrun: DDP, or
# FSDP2 with FSDP=1).
#
#   TEACHER=ckpt/sedd-small CORPUS=owt/train.bin TOKENIZER=gpt2/tokenizer.json GPUS=8 \
#     bash benchmarks/gpu_field_distill.sh
#
# The batch sizes are those of docs/ARCHITECTURE.md ("A joint-CDM step at the field's scale"):
# per GPU, B = 8 inputs x M = 8 latents = 64 student rows of 1024 tokens, the output layer and
# the likelihoods 16 positions at a time (--chunk), R = 4 targets of 16 teacher steps per input,
# the teacher's chain 4 sequences per call (--teacher-batch). With 8 GPUs the global batch is 8x.
# The student is written to $OUT as a cdm model file and in the teacher's layout
# (student-joint-k$STUDENT_STEPS/), with results.json.
#
# Environment: TEACHER (required), CORPUS (required: a .bin of token ids, nanoGPT's layout),
# TOKENIZER (a tokenizers JSON; default: bytes), DTYPE (the .bin's ids: uint16 or uint32;
# default: what the vocabulary needs), SEQ_LEN (1024), GPUS (1), DEVICE (cuda), PRECISION (bf16),
# FSDP (0), BATCH (8), LATENTS (8), TARGETS (4), TEACHER_STEPS (16), CHUNK (16),
# TEACHER_BATCH (4), STUDENT_STEPS (4), STEPS (2000), LR (3e-5), WARMUP (100), OUT (./gpu-out/field),
# PYTHON (python3), EXTRA (more `cdm distill` options, e.g. "--teacher-nfe 128 --num-samples 64").
set -euo pipefail
cd "$(dirname "$0")/.."

: "${TEACHER:?TEACHER: a SEDD, MDLM or DUO checkpoint directory}"
: "${CORPUS:?CORPUS: a pre-tokenized .bin corpus}"
PY="${PYTHON:-python3}"
OUT="${OUT:-./gpu-out/field}"
GPUS="${GPUS:-1}"
data=(--data text --data-option "path=$CORPUS" --data-option "seq_len=${SEQ_LEN:-1024}")
if [ -n "${TOKENIZER:-}" ]; then data+=(--data-option "tokenizer=$TOKENIZER"); fi
if [ -n "${DTYPE:-}" ]; then data+=(--data-option "dtype=$DTYPE"); fi
recipe=(--methods joint --student-steps "${STUDENT_STEPS:-4}"
        --latent-components "${LATENTS:-8}" --num-latents "${LATENTS:-8}"
        --num-targets "${TARGETS:-4}" --teacher-steps "${TEACHER_STEPS:-16}"
        --chunk "${CHUNK:-16}" --teacher-batch "${TEACHER_BATCH:-4}"
        --batch-size "${BATCH:-8}" --steps "${STEPS:-2000}" --lr "${LR:-3e-5}" --warmup "${WARMUP:-100}"
        --lr-schedule cosine --precision "${PRECISION:-bf16}" --device "${DEVICE:-cuda}" --quiet)
if [ "${FSDP:-0}" = 1 ]; then recipe+=(--fsdp); fi
# shellcheck disable=SC2206
extra=(${EXTRA:-})
mkdir -p "$OUT"

"$PY" -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m cdm.cli distill \
  --teacher "$TEACHER" "${data[@]}" "${recipe[@]}" "${extra[@]}" --out "$OUT" 2>&1 | tee "$OUT/distill.log"
