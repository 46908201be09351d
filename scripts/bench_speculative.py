#!/usr/bin/env python3
"""Batch-1 tokens/s of plain decoding against draft-model speculative decoding and MTP self-speculation
(`metai.infer.speculative`), on the same weights, in one run on one device; written as JSON.

Models, either trained checkpoints (metai model directories, e.g. from `metai train-*`):
  --target-dir DIR   the target; --draft-dir DIR a smaller model trained on the same tokenizer (or several, comma-separated)
  --mtp-dir DIR      a model trained with MTP (mtp_depth >= 1): drafts with its own MTP modules
or, without them, random bf16 weights (a check of the machinery and its overheads, not of a real draft):
  target    Llama-shaped: dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab 32000 (about 1.2B parameters)
  draft     the target's first --exit-layers layers with its embedding, final norm and head (an early-exit draft
            sharing the target's weights, as LayerSkip-style self-speculation; with random weights it agrees with the
            target far more often than a trained small model would)
  mtp       the target with one random MTP module (its acceptance is near zero: only the overhead is measured)

The prompt: random token ids, or with --prompt-data the start of the first validation document of a prepared data
folder (held-out text in the models' own tokenizer; acceptance on real text is what a user sees, and it is higher
than on random ids, where the two models have nothing to agree on).

Each measurement: a --prompt-len token prompt, --new-tokens new tokens, no stop token, at each --temperatures
(0 = greedy); tokens/s = new tokens / wall time of the whole call (prefill included), the median of --runs calls
after two warm-up calls, `torch.cuda.synchronize` around each. Plain decoding is `metai.infer.generate.generate`;
both it and the speculative calls are compiled (`compile=True`: decode step / short verification windows in CUDA
graphs) when --compile is on (default on CUDA). The speed-up of each speculative run is against plain decoding of the
same target in the same mode. Acceptance is Leviathan's alpha (accepted drafts per draft the target looked at).

    python scripts/bench_speculative.py --out bench/results/speculative_h100.json
    python scripts/bench_speculative.py --target-dir runs/small --draft-dir runs/micro --mtp-dir runs/small-mtp --out /tmp/spec.json
    python scripts/bench_speculative.py --device cpu --tiny --out /tmp/spec_cpu.json      # a quick check of the script
"""
import os, sys, copy, time, argparse, statistics, dataclasses
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, save_json, free, peak_mem_gb, short_error, sync, held_out_prompt
import torch
from torch import nn
from metai.core import get_device, seed_everything
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.infer.cache import make_cache
from metai.infer.generate import generate, load_model_dir
from metai.infer.speculative import speculative_generate, mtp_speculative_generate
import metai.infer.kernels as metai_kernels
from metai.infer.kernels import fold_norm_gains
import metai.infer.speculative as metai_spec


def round8(n:int) -> int: return -(-n // 8) * 8


def random_target(tiny:bool, mtp_depth:int=0) -> ModelConfig:
    if tiny: return ModelConfig(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256,
                                rope_interleaved=True, norm_eps=1e-5, mtp_depth=mtp_depth).validate()
    return ModelConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=2048,
                       rope_interleaved=True, norm_eps=1e-5, tie_embeddings=False, mtp_depth=mtp_depth).validate()


def early_exit_draft(target:Transformer, k:int) -> Transformer:
    "A draft made of the target's first `k` layers, its embedding, final norm and head (weights shared, not copied)."
    cfg = dataclasses.replace(target.cfg, n_layers=k, mtp_depth=0)
    with torch.device('meta'): d = Transformer(cfg)
    d.embed, d.layers, d.norm, d.head = target.embed, nn.ModuleList(target.layers[:k]), target.norm, target.head
    d.mtp = nn.ModuleList()
    d.freqs_cos, d.freqs_sin = target.freqs_cos, target.freqs_sin
    return d.eval()


def build_random(cfg:ModelConfig, device, dtype) -> Transformer:
    seed_everything(0)
    with torch.device(device): m = Transformer(cfg)
    m = m.to(dtype).eval(); m.init_freqs()  # RoPE tables stay fp32
    return m


def timed(fn, device, runs:int):
    "Two warm-up calls (compiles, records graphs), then the median wall time of `runs` calls; returns (seconds, last result)."
    for _ in range(2): fn()
    ts, r = [], None
    for _ in range(runs):
        sync(device); t0 = time.perf_counter(); r = fn(); sync(device); ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts, r


def bench_plain(model, prompt, n_new, temperature, compile, runs, device) -> dict:
    cache = make_cache(model, 1, round8(len(prompt) + n_new), mtp=False)
    t, ts, out = timed(lambda: generate(model, prompt, n_new, temperature=temperature, compile=compile, cache=cache, seed=0), device, runs)
    assert len(out) == n_new, len(out)
    # how varied the output is: greedy decoding of a small model often falls into a loop, which a draft predicts easily
    return dict(tokens_per_s=n_new / t, runs_s=ts, distinct_new_tokens=len(set(out)), first_new_tokens=out[:32], new_tokens=out)


def same_prefix(a:list, b:list) -> int:
    "How many leading tokens two outputs share (greedy speculation must reproduce plain greedy decoding, up to bf16 near-ties)."
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def bench_spec(target, draft, prompt, n_new, gamma, temperature, compile, runs, device) -> dict:
    "Draft-model speculation (`draft` a model) or MTP self-speculation (`draft` None), with persistent caches."
    S = min(target.cfg.max_seq_len, round8(len(prompt) + n_new + gamma))
    cache = make_cache(target, 1, S, mtp=draft is None)
    if draft is None:
        hidden = torch.zeros(1, S, target.cfg.dim, device=device, dtype=target.embed.weight.dtype)
        fn = lambda: mtp_speculative_generate(target, prompt, n_new, gamma=gamma, temperature=temperature, seed=0,
                                              cache=cache, hidden=hidden, compile=compile)
    else:
        dcache = make_cache(draft, 1, S, mtp=False)
        fn = lambda: speculative_generate(target, draft, prompt, n_new, gamma=gamma, temperature=temperature, seed=0,
                                          cache=cache, draft_cache=dcache, compile=compile)
    t, ts, (out, st) = timed(fn, device, runs)
    assert len(out) == n_new, len(out)
    return dict(tokens_per_s=n_new / t, runs_s=ts, acceptance_rate=st['acceptance_rate'],
                tokens_per_target_forward=st['tokens_per_target_forward'], target_forwards=st['target_forwards'],
                draft_forwards=st['draft_forwards'], accept_counts=st['accept_counts'], peak_mem_gb=peak_mem_gb(device), new_tokens=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', required=True, help='JSON results file (rewritten after each measurement)')
    ap.add_argument('--device', default=None, help='cuda (default when available) or cpu')
    ap.add_argument('--tiny', action='store_true', help='toy random models and few tokens: a quick check that the script runs')
    ap.add_argument('--target-dir', default=None, help='trained target (metai model directory)')
    ap.add_argument('--draft-dir', default=None, help='trained draft(s) for --target-dir (same tokenizer; a comma list: each is measured)')
    ap.add_argument('--mtp-dir', default=None, help='trained model with MTP modules')
    ap.add_argument('--exit-layers', type=int, default=2, help='layers of the random early-exit draft')
    ap.add_argument('--gammas', default='1,2,4,6', help='drafts per round to measure (draft model)')
    ap.add_argument('--mtp-gammas', default='1,2', help='drafts per round to measure (MTP)')
    ap.add_argument('--temperatures', default='0,0.8', help='sampling temperatures (0 = greedy)')
    ap.add_argument('--prompt-data', default=None, help='a prepared data folder (`metai prepare-data`): the prompt is the start of '
                    'its first validation document, text the models never trained on (default: random token ids)')
    ap.add_argument('--prompt-len', type=int, default=64)
    ap.add_argument('--new-tokens', type=int, default=256)
    ap.add_argument('--runs', type=int, default=3, help='timed calls per measurement (the median is reported)')
    ap.add_argument('--compile', choices=['auto', 'on', 'off'], default='auto', help='compile the forwards (auto: on CUDA)')
    ap.add_argument('--verify-kernels', choices=['off', 'on', 'both'], default='on',
                    help="the rounds' verification through notebook 09b's `verify_forward` (ROWS_IN_VERIFY, on by default; off: "
                    "through the modules); both: each setting twice, off first")
    ap.add_argument('--few-rows', type=int, default=None, help="verifications (and draft steps) of at most this many tokens take "
                    "notebook 09b's `gemv_few` for their products (FEW_ROWS; default: the library's setting)")
    ap.add_argument('--prologue-kernel', choices=['on', 'off'], default=None, help="the verifications compute each product's "
                    "RMSNorm / SwiGLU in notebook 09b's `rows_prologue` kernel (PROLOGUE_KERNEL; default: the library's setting)")
    ap.add_argument('--glu-rows', choices=['on', 'off'], default=None, help="the verifications compute SwiGLU's silu(a) * b in the "
                    "w1/w3 product's epilogue (GLU_ROWS, notebook 09b; default: the library's setting)")
    ap.add_argument('--fold-norms', choices=['off', 'on', 'both'], default='off', help="the speculative calls on copies of the models "
                    "with their RMSNorm gains folded into the products (`fold_norm_gains`, notebook 09b: the verification's products "
                    "normalise their rows, no norm kernels); both: each setting twice, off first")
    ap.add_argument('--replays-in-flight', default='', help="batch-1 rounds: replays launched before the host reads the oldest "
                    "(REPLAYS_IN_FLIGHT; a comma list: each is measured, e.g. 1,2; default: the library's setting)")
    a = ap.parse_args()
    rifs = [int(x) for x in a.replays_in_flight.split(',') if x] or [None]
    if a.few_rows is not None: metai_kernels.FEW_ROWS = a.few_rows
    if a.prologue_kernel is not None: metai_kernels.PROLOGUE_KERNEL = a.prologue_kernel == 'on'
    if a.glu_rows is not None: metai_kernels.GLU_ROWS = a.glu_rows == 'on'
    device = get_device(a.device)
    compile = a.compile == 'on' or (a.compile == 'auto' and device.type == 'cuda')
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    gammas, mtp_gammas = [int(g) for g in a.gammas.split(',') if g], [int(g) for g in a.mtp_gammas.split(',') if g]
    temps = [float(t) for t in a.temperatures.split(',') if t]
    if a.tiny: a.prompt_len, a.new_tokens, a.runs = min(a.prompt_len, 16), min(a.new_tokens, 32), min(a.runs, 2)
    if a.draft_dir and not a.target_dir: ap.error('--draft-dir: needs --target-dir')
    if device.type == 'cuda': torch.backends.cuda.matmul.allow_tf32 = True

    pairs = {}   # name -> (target, draft or None for MTP, description)
    if a.target_dir:
        tgt, _ = load_model_dir(a.target_dir, device=device, dtype=dtype)
        if a.draft_dir:
            from metai.infer.speculative import load_draft_model
            dirs = [d for d in a.draft_dir.split(',') if d]
            base = [os.path.basename(os.path.normpath(d)) for d in dirs]
            for d, b in zip(dirs, base):  # named by folder (by path where two folders share a name)
                name = 'trained draft' if len(dirs) == 1 else f'trained draft {b if base.count(b) == 1 else os.path.normpath(d)}'
                pairs[name] = (tgt, load_draft_model(d, tgt), f'{a.target_dir} with draft {d}')
    if a.mtp_dir:
        same = a.target_dir and os.path.realpath(a.mtp_dir) == os.path.realpath(a.target_dir)
        mm = tgt if same else load_model_dir(a.mtp_dir, device=device, dtype=dtype)[0]  # one model: its compiled graphs serve both
        pairs['trained MTP'] = (mm, None, f'{a.mtp_dir} with its {mm.cfg.mtp_depth} MTP module(s)')
    if not pairs:
        tgt = build_random(random_target(a.tiny, mtp_depth=1), device, dtype)
        k = min(a.exit_layers, tgt.cfg.n_layers - 1)
        pairs['random early-exit draft'] = (tgt, early_exit_draft(tgt, k), f'random target, draft = its first {k} of {tgt.cfg.n_layers} layers')
        pairs['random MTP'] = (tgt, None, 'random target with one random MTP module (overhead only: its drafts are random)')
    if 'trained MTP' in pairs and len(pairs) > 2:  # the first draft, then MTP, then the other drafts (a run cut short keeps one of each)
        names = list(pairs); names.insert(1, names.pop(names.index('trained MTP'))); pairs = {n: pairs[n] for n in names}
    res = dict(card=card_info(device), settings=dict(vars(a), compile=compile, dtype=str(dtype)), pairs={})
    copies = {}  # id(model) -> its folded copy, made once
    def folded(m):
        if id(m) not in copies: copies[id(m)] = fold_norm_gains(copy.deepcopy(m))
        return copies[id(m)]
    rows_default = metai_kernels.ROWS_IN_VERIFY
    for name, (target, draft, desc) in pairs.items():
        cfg = target.cfg
        prompt = (held_out_prompt(a.prompt_data, a.prompt_len, cfg.vocab_size) if a.prompt_data else
                  torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist())
        r = dict(description=desc, prompt='validation text' if a.prompt_data else 'random token ids', target_params=target.num_params(),
                 draft_params=None if draft is None else draft.num_params(), runs={})
        print(f'{name}: {desc}', flush=True)
        for T in temps:
            rt = r['runs'][str(T)] = {}
            try: rt['plain'] = bench_plain(target, prompt, a.new_tokens, T, compile, a.runs, device)
            except Exception as e: rt['plain'] = dict(error=short_error(e))
            base = rt['plain'].get('tokens_per_s')
            print(f'  T={T}: plain {base or 0:10,.1f} tokens/s  {rt["plain"].get("distinct_new_tokens", 0)} distinct of {a.new_tokens} new tokens '
                  f'{rt["plain"].get("error", "")}', flush=True)
            for g, vk, rif, fold in [(g, vk, rif, fold) for g in (gammas if draft is not None else mtp_gammas)
                                     for vk in ({'off': [False], 'on': [True], 'both': [False, True]}[a.verify_kernels]) for rif in rifs
                                     for fold in {'off': [False], 'on': [True], 'both': [False, True]}[a.fold_norms]]:
                metai_kernels.ROWS_IN_VERIFY = vk
                rows = vk and metai_kernels.verify_ok(target, torch.zeros(1, g + 1, dtype=torch.long, device=device))  # on CUDA, bf16
                if vk and not rows and a.verify_kernels == 'both':  # the switch changes nothing here: measured once
                    metai_kernels.ROWS_IN_VERIFY = rows_default; continue
                key = f'gamma={g}' + (' verify_forward' if rows else '') + ('' if rif is None else f' in flight {rif}') + (' norms folded' if fold else '')
                tg, dr = (folded(target), None if draft is None else folded(draft)) if fold else (target, draft)
                rif_default = metai_spec.REPLAYS_IN_FLIGHT
                if rif is not None: metai_spec.REPLAYS_IN_FLIGHT = rif
                try:
                    s = bench_spec(tg, dr, prompt, a.new_tokens, g, T, compile, a.runs, device)
                    if base: s['speedup'] = s['tokens_per_s'] / base
                    if base and T == 0: s['same_prefix_as_plain'] = same_prefix(s['new_tokens'], rt['plain']['new_tokens'])
                except Exception as e: s = dict(error=short_error(e))
                finally: metai_kernels.ROWS_IN_VERIFY, metai_spec.REPLAYS_IN_FLIGHT = rows_default, rif_default
                rt[key] = s
                print(f'  T={T}: {key} {s.get("tokens_per_s", 0):10,.1f} tokens/s  acceptance {s.get("acceptance_rate", 0):.2f}  '
                      f'{s.get("tokens_per_target_forward", 0):.2f} tokens/forward  speed-up {s.get("speedup", 0):.2f}x'
                      + (f'  same as plain for {s["same_prefix_as_plain"]} of {a.new_tokens}' if 'same_prefix_as_plain' in s else '')
                      + f' {s.get("error", "")}', flush=True)
                save_json(a.out, dict(res, pairs={**res['pairs'], name: r}))
        res['pairs'][name] = r
        save_json(a.out, res)
    free(device)
    print(f'wrote {a.out}')


if __name__ == '__main__': main()
