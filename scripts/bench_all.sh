#!/usr/bin/env bash
# Every GPU check and benchmark of metai in order of what is least often measured, each under its own time limit,
# results as JSON (and a log per step) in OUT. Run from the repository root on a machine with one CUDA GPU:
#
#   OUT=/tmp/bench GPT_FAST_DIR=~/gpt-fast NANOGPT_DIR=~/nanoGPT DATA_DIR=output_micro/data bash scripts/bench_all.sh [STEP ...]
#
# STEPs (default: all, in this order): cuda-tests decode-dense kernels gemv-tiles quant decode-moe decode-mla speculative graph-launch model train fp8.
# Also decode-1b: the 1B decode measurement alone (one device call).
# The baselines are public code checked out beside metai (gpt-fast for decode-dense, nanoGPT for train); a step
# whose baseline folder is not given runs without it. DATA_DIR is a `metai prepare-data` folder (with corpus/zh.txt
# and corpus/en.txt), needed by speculative (it trains a target/draft pair on it) and by train's quality check.
# Each step's limit (seconds) can be changed with LIMIT_<STEP> (dashes as underscores), e.g. LIMIT_decode_dense=600.
# TRAIN_MODES adds torch.compile modes to train's rows, nanoGPT's included (e.g. TRAIN_MODES=max-autotune-no-cudagraphs: minutes of autotuning).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/run}; mkdir -p "$OUT"
CARD=$(python3 -c "import torch; n = torch.cuda.get_device_name(0).lower(); print(next((c for c in ('h200', 'h100', 'a100', 'l40s') if c in n), 'gpu'))")
export PYTHONUNBUFFERED=1
STEPS=${*:-cuda-tests decode-dense kernels gemv-tiles quant decode-moe decode-mla speculative graph-launch model train fp8}
quiet() { grep -v -e 'arn' -e 'softmax' -e 'self.gen' -e 'capture_end' -e 'reduction' -e '^$'; }
limit() { local v="LIMIT_${1//-/_}"; echo "${!v:-$2}"; }

for step in $STEPS; do
  echo "== $step ($(date -u +%H:%M:%S))"
  case $step in
    cuda-tests)    # every CUDA-only test first: a broken CUDA path shows here, not inside a benchmark (compiling takes minutes)
      timeout "$(limit $step 400)" python3 -m pytest -q -m cuda tests/ 2>&1 | tail -15 | tee "$OUT/cuda_tests.log" ;;
    decode-dense)  # 125M and 1B Llama shapes: metai (8 steps / CUDA graph, 1 step / graph, frozen) vs gpt-fast and transformers
      timeout "$(limit $step 540)" python3 scripts/bench_decode.py --out "$OUT/decode_$CARD.json" --models llama-125m,llama-1b \
        --no-eager --streamed --sample-kernel --attn-merge --product-tiles ${GPT_FAST_DIR:+--gpt-fast-dir "$GPT_FAST_DIR"} 2>&1 | quiet | tee "$OUT/decode_dense.log" ;;
    decode-1b)     # issue 5's measurement alone (not in the default list; decode-dense covers it): the 1B shape, metai compiled,
                   # gpt-fast, all decode switches together, then each alone; on an H100 the switched row ends about 420 s in
      timeout "$(limit $step 580)" python3 scripts/bench_decode.py --out "$OUT/decode_1b_$CARD.json" --models llama-1b \
        --no-eager --no-hf --no-freeze --no-chunk1 --no-unfused --sample-kernel --attn-merge --product-tiles --mla-contexts '' \
        ${GPT_FAST_DIR:+--gpt-fast-dir "$GPT_FAST_DIR"} 2>&1 | quiet | tee "$OUT/decode_1b.log" ;;
    kernels)       # the decode kernels alone, cold, against what they replace (products vs cuBLAS, attention vs its reference, draws)
      timeout "$(limit $step 200)" python3 scripts/bench_kernels.py --out "$OUT/kernels_$CARD.json" 2>&1 | quiet | tail -8 | tee "$OUT/kernels.log" ;;
    gemv-tiles)    # every gemv (then gemv_int4) tile for each 1B product inside the 16-layer chain (CUDA graph, PDL): checks _LONG_TILE and
                   # which int4 tile streams best; the bf16 sweep took 45 s on an H200
      timeout "$(limit $step 300)" bash -c "python3 scripts/bench_gemv_tiles.py --out '$OUT/gemv_tiles_$CARD.json' &&
        python3 scripts/bench_gemv_tiles.py --int4 --out '$OUT/gemv_int4_tiles_$CARD.json'" 2>&1 | quiet | tail -12 | tee "$OUT/gemv_tiles.log" ;;
    quant)         # int4 and bf16 decode of the 1B shape on the same path, each with a profile of 32 compiled steps (H200 compiles: 78 s for the
                   # bf16 step, 97 s for int4 through generate; give two variants the whole 540 s)
      timeout "$(limit $step 540)" python3 scripts/bench_quant.py --out "$OUT/quant_$CARD.json" \
        --variants ${QUANT_VARIANTS:-bf16,int4-g64+head} 2>&1 | quiet | tail -12 | tee "$OUT/quant.log" ;;
    decode-moe)    # the small MoE (no baseline runs it); a first compiled call takes about 77 s on an H200
      timeout "$(limit $step 200)" python3 scripts/bench_decode.py --out "$OUT/decode_moe_$CARD.json" \
        --models small-moe --no-eager --no-hf --no-chunk1 --no-freeze --no-unfused 2>&1 | quiet | tee "$OUT/decode_moe.log" ;;
    decode-mla)    # absorbed vs naive MLA decode at 4K and 32K on the DeepSeek-shaped model cut to 2 layers, and DeepSeek-V3.2's
                   # sparse attention (top-2048) beside them: one compile per mode and context; the first two modes took 217 s on
                   # an H200 (4 layers did not fit 120 s), the third is untimed (about 330 s expected in all)
      timeout "$(limit $step 400)" python3 scripts/bench_decode.py --out "$OUT/decode_mla_$CARD.json" \
        --models deepseek-mla --mla-only --layers 2 --mla-steps 32 --dsa-topk 2048 2>&1 | quiet | tee "$OUT/decode_mla.log" ;;
    speculative)   # a ~1B target (the 1B shape, 8K vocab) with one MTP module, and a 2-layer 512-wide draft (context 512) trained twice
                   # on DATA_DIR: on its own, and distilled from the target (--distill-from); then greedy speculation on a held-out
                   # prompt with each draft and with MTP. Give it a 600 s device call of its own: on an H200 (2026-12-03) the
                   # target's 350 steps took 158 s with compilation, the draft's 400 steps 29 s (the distilled one also runs the
                   # target on every batch), the first compiled plain generate of the target about 115 s, and each speculative
                   # setting about 35-70 s more (2026-12-03, run 6: training 236 s, plain + 3 settings 176 s). The rounds verify with
                   # notebook 09b's verify_forward (ROWS_IN_VERIFY, on by default); `--verify-kernels both` also measures the module path.
                   # Speculation pays when a target step costs many draft steps: a draft's cost is its kernel count (layers), not its width.
                   # The distilled draft trains 800 steps with weight 16 (run 6: 400 steps, weight 4, acceptance 0.80; on the CPU twice the
                   # steps raised its top-1 agreement with the target from 0.67 to 0.76, weight 16 to 0.70: bench/NOTES.md).
                   # The target's MTP module trains with self-distillation (--mtp-distill 1: on the CPU its drafts' agreement with the
                   # model's own next choice rose from 0.58 to 0.66 for 0.6% more main loss, scripts/exp_mtp_distill.py; runs 1-7 had it off).
      [ -n "${DATA_DIR:-}" ] || { echo "speculative: needs DATA_DIR"; continue; }
      # SPEC_DIR: train into this folder and keep it; a later run with the same SPEC_DIR (a warm machine) reuses what is there
      D=${SPEC_DIR:-$(mktemp -d)}; mkdir -p "$D"; [ -d "$D/data" ] || cp -r "$DATA_DIR" "$D/data"
      C=(--chinese-path "$D/data/corpus/zh.txt" --english-path "$D/data/corpus/en.txt" --data-dir "$D/data" --seq-len 512
         --batch-size 32 --eval-interval 1000 --sample-prompt "")
      M='import sys; from metai.cli import main; sys.exit(main())'
      W=(--preset micro --num-layers 2 --hidden-dim 512 --num-heads 8 --num-kv-heads 4 --mlp-dim 1536 "${C[@]}" --steps 400 --lr 2e-3 --compile)
      [ -f "$D/target/model.safetensors" ] || timeout "$(limit train-target 170)" python3 -c "$M" train-custom "${C[@]}" \
        --hidden-dim 2048 --num-layers 16 --num-heads 16 --num-kv-heads 4 --mlp-dim 8192 --mtp-depth 1 --mtp-distill 1 --steps 300 --lr 4e-4 \
        --compile --output-dir "$D/target" 2>&1 | tail -3 | tee "$OUT/train_target.log"
      # SPEC_DRAFTS: the drafts to train and measure (wide2: on its own, wide2d: distilled); SPEC_ARGS: bench_speculative.py's
      # settings, e.g. SPEC_DRAFTS=wide2d SPEC_ARGS="--gammas 6 --mtp-gammas 1 --temperatures 0,0.8 --replays-in-flight 1,2"
      DRAFTS=${SPEC_DRAFTS:-wide2 wide2d}; DIRS=""
      for w in $DRAFTS; do DIRS="$DIRS${DIRS:+,}$D/$w"; done
      case " $DRAFTS " in *" wide2 "*) [ -f "$D/wide2/model.safetensors" ] ||
        timeout "$(limit train-draft 50)" python3 -c "$M" train-custom "${W[@]}" --output-dir "$D/wide2" 2>&1 | tail -3 | tee "$OUT/train_draft_wide2.log" ;; esac
      case " $DRAFTS " in *" wide2d "*) [ -f "$D/wide2d/model.safetensors" ] ||
        timeout "$(limit train-draft-distilled 150)" python3 -c "$M" train-custom "${W[@]}" --steps 800 --distill-from "$D/target" --distill-weight 16 \
          --output-dir "$D/wide2d" 2>&1 | tail -3 | tee "$OUT/train_draft_wide2d.log" ;; esac
      timeout "$(limit $step 330)" python3 scripts/bench_speculative.py --target-dir "$D/target" --draft-dir "$DIRS" \
        --mtp-dir "$D/target" --prompt-data "$D/data" ${SPEC_ARGS:---gammas 4,6 --mtp-gammas 1 --temperatures 0} --runs 2 --verify-kernels on \
        --out "$OUT/speculative_$CARD.json" 2>&1 | quiet | tee "$OUT/speculative.log" ;;
    model)         # forward + backward: ds-mla against transformers DeepseekV3 (both also as CUDA graphs), gpt2, small
      timeout "$(limit $step 540)" python3 scripts/bench_model.py --device cuda --out "$OUT/model_$CARD.json" --extra-modes reduce-overhead --skip-eager \
        --time-budget "$(( $(limit $step 540) - 30 ))" 2>&1 | quiet | tail -20 | tee "$OUT/model.log" ;;
    train)         # training step against nanoGPT's GPT-2 124M (metai also with inductor's loss in place of its two Triton loss kernels), and the quality check at equal tokens
      [ -n "${NANOGPT_DIR:-}" ] || { echo "train: needs NANOGPT_DIR"; continue; }
      timeout "$(limit $step 540)" python3 scripts/bench_train.py --device cuda --nanogpt-dir "$NANOGPT_DIR" --inductor-ce ${TRAIN_MODES:+--extra-modes "$TRAIN_MODES"} \
        ${DATA_DIR:+--data-dir "$DATA_DIR"} --out "$OUT/train_$CARD.json" --time-budget "$(( $(limit $step 540) - 30 ))" 2>&1 \
        | quiet | tail -20 | tee "$OUT/train.log" ;;
    graph-launch)  # the host's time inside a CUDA graph launch by what the graph holds (Triton / aten kernels, cuBLAS, RNG, copies); under a minute
      timeout "$(limit $step 120)" python3 scripts/bench_graph_launch.py --out "$OUT/graph_launch_$CARD.json" 2>&1 | quiet | tee "$OUT/graph_launch.log" ;;
    fp8)           # would FP8 products pay for gpt2's linear shapes? bf16 vs per-tensor fp8 with its casts, per shape and per step
      timeout "$(limit $step 150)" python3 scripts/bench_fp8.py --out "$OUT/fp8_$CARD.json" 2>&1 | quiet | tee "$OUT/fp8.log" ;;
    *) echo "unknown step: $step (cuda-tests decode-dense kernels gemv-tiles quant decode-moe decode-mla speculative graph-launch model train fp8; also decode-1b)"; exit 2 ;;
  esac
done
echo "== done ($(date -u +%H:%M:%S)): $OUT"
