#!/usr/bin/env bash
# The whole path on the shipped sample corpus, everything under runs/demo/:
#   SentencePiece tokenizer (8k) -> packed Megatron shards -> tiny Llama on 2 CPU ranks (DeepSpeed
#   ZeRO-2) -> Hugging Face export (verified: logits and tokenizer parity) -> transformers generation.
# Re-running resumes training from the latest checkpoint (and finishes at once if it is done).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch_scripts/common.sh
source launch_scripts/common.sh   # the clone's .venv when none is active
need_env
RUN=runs/demo
CORPUS=data_pipeline/sample_corpus
NPROC=${NPROC:-2}
PORT=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # one core per rank on a 2-core machine
mkdir -p "$RUN"
stage() { printf '\n==> [%s] %s\n' "$(date +%T)" "$*"; }

stage "1/5 train tokenizer (BPE, vocab 8000) on $CORPUS"
python -m lmforge.data_pipeline train-tokenizer --input "$CORPUS/wikipedia" "$CORPUS/books" --vocab-size 8000 --output "$RUN/tokenizer"

stage "2/5 tokenize into Megatron-format shards"
python -m lmforge.data_pipeline preprocess --input "$CORPUS/wikipedia" "$CORPUS/books" --tokenizer "$RUN/tokenizer/tokenizer.model" \
  --output "$RUN/data" --valid-fraction 0.05 --strip-gutenberg

stage "3/5 train the tiny preset on $NPROC CPU ranks, ZeRO-2 (TensorBoard: tensorboard --logdir $RUN/tensorboard)"
python -m lmforge.trainer.launch -- deepspeed --num_gpus "$NPROC" --master_addr 127.0.0.1 --master_port "$PORT" \
  --module lmforge.trainer.train --config configs/demo.yaml "$@"

stage "4/5 export to Hugging Face format (verifies logits and tokenizer parity)"
python -m lmforge.trainer.export_hf --checkpoint "$RUN/checkpoints" --output "$RUN/hf" --overwrite

stage "5/5 generate with transformers from $RUN/hf"
python -m lmforge.trainer.generate --model "$RUN/hf" --prompt "Alice was beginning to"
stage "done: $RUN (metrics.jsonl, tensorboard/, checkpoints/, hf/)"
