#!/usr/bin/env bash
# Every GPU check and benchmark of metai in order of what is least often measured, each under its own time limit,
# results as JSON (and a log per step) in OUT. Run from the repository root on a machine with one CUDA GPU:
#
#   OUT=/tmp/bench GPT_FAST_DIR=~/gpt-fast NANOGPT_DIR=~/nanoGPT DATA_DIR=output_micro/data bash scripts/bench_all.sh [STEP ...]
#
# STEPs (default: all, in this order): cuda-tests decode-dense quant decode-moe speculative model train fp8.
# The baselines are public code checked out beside metai (gpt-fast for decode-dense, nanoGPT for train); a step
# whose baseline folder is not given runs without it. DATA_DIR is a `metai prepare-data` folder (with corpus/zh.txt
# and corpus/en.txt), needed by speculative (it trains a target/draft pair on it) and by train's quality check.
# Each step's limit (seconds) can be changed with LIMIT_<STEP> (dashes as underscores), e.g. LIMIT_decode_dense=600.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/run}; mkdir -p "$OUT"
CARD=$(python3 -c "import torch; n = torch.cuda.get_device_name(0).lower(); print(next((c for c in ('h200', 'h100', 'a100', 'l40s') if c in n), 'gpu'))")
export PYTHONUNBUFFERED=1
STEPS=${*:-cuda-tests decode-dense quant decode-moe speculative model train fp8}
quiet() { grep -v -e 'arn' -e 'softmax' -e 'self.gen' -e 'capture_end' -e 'reduction' -e '^$'; }
limit() { local v="LIMIT_${1//-/_}"; echo "${!v:-$2}"; }

for step in $STEPS; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case $step in
    cuda-tests)    # every CUDA-only test first: a broken CUDA path shows here, not inside a benchmark (compiling takes minutes)
      timeout "$(limit $step 400)" python3 -m pytest -q -m cuda tests/ 2>&1 | tail -15 | tee "$OUT/cuda_tests.log" ;;
    decode-dense)  # 125M and 1B Llama shapes: metai (8 steps / CUDA graph, 1 step / graph, frozen) vs gpt-fast and transformers
      timeout "$(limit $step 540)" python3 scripts/bench_decode.py --out "$OUT/decode_$CARD.json" --models llama-125m,llama-1b \
        --no-eager ${GPT_FAST_DIR:+--gpt-fast-dir "$GPT_FAST_DIR"} 2>&1 | quiet | tee "$OUT/decode_dense.log" ;;
    quant)         # int4 (and bf16) decode of the 1B shape on the same path
      timeout "$(limit $step 420)" python3 scripts/bench_quant.py --out "$OUT/quant_$CARD.json" \
        --variants bf16,int4-g64+head,int4-g128+head,int4-g64 2>&1 | quiet | tail -12 | tee "$OUT/quant.log" ;;
    decode-moe)    # small MoE and the DeepSeek-shaped MLA model; absorbed vs naive MLA at 4K and 32K
      timeout "$(limit $step 480)" python3 scripts/bench_decode.py --out "$OUT/decode_moe_mla_$CARD.json" \
        --models small-moe,deepseek-mla --no-eager --no-hf --no-chunk1 2>&1 | quiet | tee "$OUT/decode_moe.log" ;;
    speculative)   # (each gamma and temperature compiles and captures its own rounds: a minute or more each) a ~1B target (the 1B shape, 8K vocab) with one MTP module and the micro draft (its context raised to 512), trained on DATA_DIR;
                   # speculation pays when a target step costs many draft steps, so the target is the largest that trains in minutes
      [ -n "${DATA_DIR:-}" ] || { echo "speculative: needs DATA_DIR"; continue; }
      D=$(mktemp -d); cp -r "$DATA_DIR" "$D/data"
      C=(--chinese-path "$D/data/corpus/zh.txt" --english-path "$D/data/corpus/en.txt" --data-dir "$D/data" --seq-len 512
         --batch-size 32 --eval-interval 1000 --sample-prompt "")
      timeout "$(limit train-target 420)" python3 -c 'import sys; from metai.cli import main; sys.exit(main())' train-custom "${C[@]}" \
        --hidden-dim 2048 --num-layers 16 --num-heads 16 --num-kv-heads 4 --mlp-dim 8192 --mtp-depth 1 --steps 500 --lr 4e-4 \
        --compile --output-dir "$D/target" 2>&1 | tail -3 | tee "$OUT/train_target.log"
      timeout "$(limit train-draft 120)" python3 -c 'import sys; from metai.cli import main; sys.exit(main())' train-custom --preset micro "${C[@]}" \
        --steps 1000 --lr 2e-3 --compile --output-dir "$D/draft" 2>&1 | tail -3 | tee "$OUT/train_draft.log"
      timeout "$(limit $step 540)" python3 scripts/bench_speculative.py --target-dir "$D/target" --draft-dir "$D/draft" \
        --mtp-dir "$D/target" --prompt-data "$D/data" --gammas 2,4 --mtp-gammas 1 --temperatures 0,0.8 --out "$OUT/speculative_$CARD.json" 2>&1 \
        | quiet | tee "$OUT/speculative.log" ;;
    model)         # forward + backward: ds-mla against transformers DeepseekV3 (both also as CUDA graphs), gpt2, small
      timeout "$(limit $step 540)" python3 scripts/bench_model.py --device cuda --out "$OUT/model_$CARD.json" --extra-modes reduce-overhead --skip-eager \
        --time-budget "$(( $(limit $step 540) - 30 ))" 2>&1 | quiet | tail -20 | tee "$OUT/model.log" ;;
    train)         # training step against nanoGPT's GPT-2 124M (metai also as CUDA graphs), and the quality check at equal tokens
      [ -n "${NANOGPT_DIR:-}" ] || { echo "train: needs NANOGPT_DIR"; continue; }
      timeout "$(limit $step 540)" python3 scripts/bench_train.py --device cuda --nanogpt-dir "$NANOGPT_DIR" --extra-modes reduce-overhead \
        ${DATA_DIR:+--data-dir "$DATA_DIR"} --out "$OUT/train_$CARD.json" --time-budget "$(( $(limit $step 540) - 30 ))" 2>&1 \
        | quiet | tail -20 | tee "$OUT/train.log" ;;
    fp8)           # would FP8 products pay for gpt2's linear shapes? bf16 vs per-tensor fp8 with its casts, per shape and per step
      timeout "$(limit $step 150)" python3 scripts/bench_fp8.py --out "$OUT/fp8_$CARD.json" 2>&1 | quiet | tee "$OUT/fp8.log" ;;
    *) echo "unknown step: $step (cuda-tests decode-dense quant decode-moe speculative model train fp8)"; exit 2 ;;
  esac
done
echo "== done ($(date -u +%H:%M:%S)): $OUT"
