#!/usr/bin/env bash
# LaCT with r=2 stacked SwiGLU fast-weight MLPs ("TTT done right", 2-layer MLP), end-to-end, low-rank
# momentum: the 816M config, trained with FSDP2 on 8 GPUs; or a tiny CPU run of the same code path.
#
#   bash scripts/train_tttdr_2-layer-mlp.sh           # 8 GPUs: batch 1 x 32K tokens per GPU, bf16,
#                                                     # grad accum 4, AdamW lr 1e-3, 1024 warmup,
#                                                     # cosine over 40,960 steps, clip 1.0, compile, AC
#   bash scripts/train_tttdr_2-layer-mlp.sh cpu       # tiny LaCT r=2 on the CPU, under a minute
#
# GPU mode runs the job file configs/jobs/tttdr_2-layer-mlp_8gpu.toml (every option of the recipe).
# Anything after the mode is passed on to scripts/train.py (e.g. --steps 100 --no-progress).
# Environment overrides (GPU mode): NGPU (8), CONFIG, DATASET (HF id or local path; default: the
# Python standard library, far too small for 40,960 x 1M tokens: set it), TEXT_FIELD (text),
# TOKENIZER (fla-hub/transformer-1.3B-100B: the Llama-2 32K vocabulary of the 816M config, needs
# the hub or a local copy), OUT (results/tttdr_2-layer-mlp), PYTHON (default: the active virtual
# environment's python, else the project's .venv/bin/python, else python3 on the PATH).
# The run resumes from OUT/checkpoints when it holds a checkpoint (re-run the same command after a
# preemption); SIGTERM saves a checkpoint before exiting.
set -euo pipefail

MODE="${1:-gpu}"
if [[ $# -gt 0 ]]; then shift; fi
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  # an explicit PYTHON wins; then an activated venv; then the project's own .venv; then the PATH
  if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then PYTHON="$VIRTUAL_ENV/bin/python"
  elif [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python
  elif command -v python3 >/dev/null 2>&1; then PYTHON=python3
  else PYTHON=python
  fi
fi
if ! "$PYTHON" -c "import torch, transformers" >/dev/null 2>&1; then
  echo "error: $PYTHON cannot import torch and transformers; install the project (README) into .venv," \
       "activate its virtual environment, or set PYTHON=/path/to/python" >&2
  exit 2
fi

case "$MODE" in
  gpu)
    NGPU="${NGPU:-8}"
    CONFIG="${CONFIG:-configs/816M_lact_swiglu_nh4_fwlow_rank_momentum_r2_e2e.json}"
    TOKENIZER="${TOKENIZER:-fla-hub/transformer-1.3B-100B}"
    OUT="${OUT:-results/tttdr_2-layer-mlp}"
    # every training option lives in the job file; the environment overrides above go on the command line
    DATA_ARGS=()
    if [[ -n "${DATASET:-}" ]]; then DATA_ARGS=(--dataset "$DATASET" --text-field "${TEXT_FIELD:-text}"); fi
    export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NGPU - 1)))}"
    exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NGPU" scripts/train.py \
      --job configs/jobs/tttdr_2-layer-mlp_8gpu.toml \
      --config "$CONFIG" --tokenizer "$TOKENIZER" "${DATA_ARGS[@]}" --out "$OUT" "$@"
    ;;
  cpu)
    OUT="${OUT:-results/tttdr_2-layer-mlp_cpu}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
    # same model family and code path (1-rank FSDP2, manual backprop), tiny sizes: 2 layers, hidden 64
    exec "$PYTHON" scripts/train.py \
      --model lact --config configs/train_debug_lact.json --max-docs 50 \
      --seq-len 128 --batch-size 2 --grad-accum 1 \
      --lr 3e-3 --warmup-steps 4 --steps 20 --min-lr-ratio 0.1 --clip 1.0 --weight-decay 0.1 --fp32 \
      --checkpoint-interval 10 --log-every 5 --out "$OUT" --resume "$@"
    ;;
  *)
    echo "usage: bash scripts/train_tttdr_2-layer-mlp.sh [gpu|cpu] [extra scripts/train.py args]" >&2
    exit 2
    ;;
esac
