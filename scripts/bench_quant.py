#!/usr/bin/env python
"""Batch-1 greedy decode tokens/s, bf16 against int4 weight-only (`metai.infer.quant`), on the ~1B Llama-shaped model
(dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab 128256, untied head, random weights), or a trained model
(`--model-dir`), with a random prompt or one from held-out text (`--prompt-data`).

    python scripts/bench_quant.py --out bench_quant.json                       # one CUDA GPU (the real benchmark)
    python scripts/bench_quant.py --device cpu --tiny --out /tmp/bq.json       # smoke test: tiny model on the CPU

Each variant: a fresh bf16 copy of the same model, quantized in place (`quantize_model`) and prepared (`prepare_int4`:
kernel layouts, the projections of one input joined), then a 64-token prompt and 256 new greedy tokens through
metai's own decode path: `make_cache` (static KV cache), `prefill`, and `decode_one_token` compiled with inductor,
one step per call, timed decode only with CUDA events after a warm-up, and profiled over 32 steps; then, unless
`--no-graphs`, the whole `generate(compile=True)` call (8 steps per CUDA graph, as `metai generate --compile` runs it),
prefill included and not. `--graphs-only` keeps only the latter. The cached decode is checked against the model's plain
(uncached) forward: greedy tokens must match (fp32, and per variant in bf16).

Variants (`--variants`): `bf16`; `int4-g{32,64,128}` (block linears int4, head bf16: `quantize_model`'s default);
`int4-g{G}+head` (head int4 too, as gpt-fast does). Writes JSON to `--out`.
"""
import argparse, contextlib, copy, json, os, platform, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import save_json, profile_fn, held_out_prompt  # atomic JSON; kernel time by category; a prompt from held-out text
import torch
import torch.nn as nn
import torch.nn.functional as F

from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.infer.cache import make_cache
from metai.infer.generate import load_model_dir, prefill, fast_prefill, decode_one_token, generate, compiled_decode_one_token, _compile_settings, clear_graphs
from metai.infer.quant import quantize_model, prepare_int4, Int4Linear

LLAMA_1B = dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, rope_theta=500000.0,
                max_seq_len=2048, tie_embeddings=False, norm_eps=1e-5)
TINY = dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, rope_theta=10000.0,
            max_seq_len=256, tie_embeddings=False, norm_eps=1e-5)


def new_cache(model:Transformer, n_tokens:int, compiled:bool):
    "metai's static KV cache for one row and `n_tokens` positions (rounded up to 8, as generate does)."
    cache = make_cache(model, 1, -(-n_tokens // 8) * 8, mtp=False)
    if compiled:
        for t in cache.a + cache.b: torch._dynamo.mark_static_address(t)
    return cache


@torch.no_grad()
def greedy_decode(model:Transformer, prompt:torch.Tensor, n_new:int, step=decode_one_token, cache=None):
    """`prefill` then `n_new` greedy `step`s (metai's `decode_one_token`, maybe compiled) on `cache` (reused: keep its
    addresses). -> (tokens (B, n_new), seconds for tokens 2..n_new)."""
    device, P = prompt.device, prompt.shape[1]
    if cache is None: cache = new_cache(model, P + n_new, False)
    compiled = step is not decode_one_token
    sdpa = (torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH) if compiled and device.type == 'cuda'
            else contextlib.nullcontext())  # as metai.infer.generate does when compiled
    with sdpa:
        tok = prefill(model, prompt, cache).argmax(-1, keepdim=True)          # (B, 1)
        pos = torch.tensor([P], device=device)
        out = [tok.clone()]
        if device.type == 'cuda':
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
        else: t_start = time.perf_counter()
        for _ in range(n_new - 1):
            tok, _ = step(model, tok, pos, cache, None, 0.0)
            pos += 1
            out.append(tok.clone())
        if device.type == 'cuda':
            t1.record(); torch.cuda.synchronize(); secs = t0.elapsed_time(t1) / 1e3
        else: secs = time.perf_counter() - t_start
    return torch.cat(out, 1), secs


@torch.no_grad()
def greedy_reference(model:Transformer, prompt:torch.Tensor, n_new:int) -> torch.Tensor:
    "Greedy tokens from the model's plain forward over the whole sequence each step (no cache): the slow reference."
    ids = prompt
    for _ in range(n_new):
        nxt = model(ids)[0][:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids[:, prompt.shape[1]:]


def state_bytes(module:nn.Module) -> int:
    seen, n = set(), 0
    for t in module.state_dict().values():
        key = (t.data_ptr(), t.numel())
        if key not in seen: seen.add(key); n += t.numel() * t.element_size()
    return n


def parse_variant(v:str):
    "'bf16' -> None; 'int4-g64' -> (64, False); 'int4-g64+head' -> (64, True)."
    if v == 'bf16': return None
    head = v.endswith('+head')
    body = v[:-5] if head else v
    if not body.startswith('int4-g') or not body[6:].isdigit(): raise SystemExit(f"--variants: bad variant {v!r} (bf16, int4-gG or int4-gG+head)")
    return int(body[6:]), head


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda', help="'cuda' or 'cpu'")
    ap.add_argument('--tiny', action='store_true', help='a tiny model (smoke test) instead of the ~1B one')
    ap.add_argument('--variants', default='bf16,int4-g32+head,int4-g64+head,int4-g128+head,int4-g64',
                    help='comma-separated: bf16, int4-gG (head bf16), int4-gG+head')
    ap.add_argument('--prompt-len', type=int, default=64)
    ap.add_argument('--new-tokens', type=int, default=256)
    ap.add_argument('--compile', dest='compile', action='store_true', default=None, help='torch.compile the decode step (default: on CUDA)')
    ap.add_argument('--no-compile', dest='compile', action='store_false')
    ap.add_argument('--check-tokens', type=int, default=8, help='greedy tokens compared with the uncached forward')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--no-graphs', action='store_true', help="skip the timing through generate's CUDA-graph path")
    ap.add_argument('--graphs-only', action='store_true', help="time only generate's CUDA-graph path (one compile per variant; no per-step timing or profile)")
    ap.add_argument('--model-dir', default=None, help='a trained metai model directory instead of the random ~1B model')
    ap.add_argument('--prompt-data', default=None, help='a prepared data folder: the prompt is the start of its validation split (default: random ids)')
    ap.add_argument('--out', required=True, help='JSON results file')
    a = ap.parse_args(argv)

    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): raise SystemExit('--device cuda: no CUDA device (use --device cpu --tiny)')
    variants = [(v, parse_variant(v)) for v in a.variants.split(',')]
    compile_ = device.type == 'cuda' if a.compile is None else a.compile
    if a.tiny and a.new_tokens == 256: a.prompt_len, a.new_tokens = 16, 32
    torch.manual_seed(a.seed)
    if a.model_dir:
        base = load_model_dir(a.model_dir, device=device, dtype=torch.float32)[0]; cfg = base.cfg
    else:
        cfg = ModelConfig(**(TINY if a.tiny else LLAMA_1B)).validate()
        with torch.device(device): base = Transformer(cfg)      # random weights, fp32 master
    base.eval()
    prompt = (torch.tensor([held_out_prompt(a.prompt_data, a.prompt_len, cfg.vocab_size)], device=device) if a.prompt_data
              else torch.randint(0, cfg.vocab_size, (1, a.prompt_len), device=device))

    # correctness of metai's cached decode itself: fp32, eager, against the uncached forward
    n_chk = min(a.check_tokens, a.new_tokens)
    check = dict(tokens=n_chk, greedy_match_fp32=bool(torch.equal(greedy_decode(base, prompt, n_chk)[0],
                                                                   greedy_reference(base, prompt, n_chk))))
    print(f'cached decode vs uncached forward (fp32, {n_chk} greedy tokens): {"match" if check["greedy_match_fp32"] else "MISMATCH"}')

    base = base.to(torch.bfloat16)
    results = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else (platform.processor() or 'cpu'),
                   torch=torch.__version__, model=a.model_dir or ('tiny' if a.tiny else 'llama-1b-shaped'), config=cfg.to_dict(),
                   prompt='validation text' if a.prompt_data else 'random token ids',
                   batch=1, prompt_len=a.prompt_len, new_tokens=a.new_tokens, compile=compile_, dtype='bfloat16',
                   engine='metai.infer.cache.make_cache + metai.infer.generate.prefill/decode_one_token, greedy',
                   timing='decode only (tokens 2..N, prefill excluded), after a warm-up run', check=check, variants={})
    for name, q in variants:
        model = copy.deepcopy(base)
        info = dict(quantized=q is not None)
        clear_graphs(); torch._dynamo.reset()  # a fresh compile per variant (no guard-cache overflow back to eager)
        try:
            if q is not None:
                G, head = q
                quantize_model(model, group_size=G, include_head=head)
                info['kernels'] = prepare_int4(model, device)
                r = model.quant_config['report']
                info.update(group_size=G, include_head=head, skipped=model.quant_config['skipped'],
                            bits_per_quantized_weight=r['bits_per_quantized_weight'])
                # the int4 matmul against its dequantized reference, on one real layer
                lin = model.layers[0].ffn.w1
                lin = lin.__dict__.get('joined') or lin  # w1/w3 joined by prepare_int4: the layer decoding runs
                x = torch.randn(4, lin.in_features, device=device, dtype=torch.bfloat16)
                y, yr = lin(x).float(), F.linear(x, lin.dequantize(torch.bfloat16)).float()
                info['kernel_rel_err'] = ((y - yr).abs().max() / yr.abs().max()).item()
            eager = greedy_decode(model, prompt, n_chk)[0]
            info['greedy_match_uncached'] = bool(torch.equal(eager, greedy_reference(model, prompt, n_chk)))
            info['weight_bytes'] = state_bytes(model)
            # bytes a decode step reads: all weights but the embedding table (one row of it)
            info['weight_bytes_read_per_token'] = info['weight_bytes'] - state_bytes(model.embed) + cfg.dim * 2
            if device.type == 'cuda': torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(device)
            if a.graphs_only: toks = eager  # the graph path's tokens are compared with the eager cached decode
            else:
                cache = new_cache(model, a.prompt_len + a.new_tokens, compile_)  # one cache and one compiled step per variant
                step = compiled_decode_one_token(device) if compile_ else decode_one_token  # inductor, one step per call
                t = time.perf_counter()
                with _compile_settings(device): greedy_decode(model, prompt, min(a.new_tokens, 16), step, cache)  # warm-up: compiles
                info['warmup_s'] = time.perf_counter() - t
                toks, secs = greedy_decode(model, prompt, a.new_tokens, step, cache)
                info['compiled_vs_eager_first_tokens_agree'] = (toks[:, :n_chk] == eager).float().mean().item()
                info['decode_s'] = secs
                info['tokens_per_s'] = (a.new_tokens - 1) / secs
                info['ms_per_token'] = 1e3 * secs / (a.new_tokens - 1)
                info['achieved_GB_per_s'] = info['weight_bytes_read_per_token'] * info['tokens_per_s'] / 1e9
            if compile_ and device.type == 'cuda' and not a.graphs_only:  # where a step's time goes: the kernels of 32 compiled steps
                def steps32():
                    tok, pos = torch.tensor([[int(toks[0, -1])]], device=device), torch.tensor([a.prompt_len], device=device)  # strides (1, 1) as in the timing: a slice of toks would recompile
                    with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                        for _ in range(32): tok, _ = step(model, tok, pos, cache, None, 0.0); pos += 1
                try: info['profile_32_steps'] = profile_fn(steps32, device, steps=1, top=12)
                except Exception as e: info['profile_error'] = f'{type(e).__name__}: {str(e)[:200]}'
            if compile_ and device.type == 'cuda' and not a.no_graphs:  # metai generate's own path: 8 decode steps per CUDA graph
                gcache = make_cache(model, 1, -(-(a.prompt_len + a.new_tokens) // 8) * 8, mtp=False)
                pl = prompt[0].tolist()
                t = time.perf_counter()
                for _ in range(2): generate(model, pl, a.new_tokens, temperature=0, compile=True, cache=gcache)  # compile, capture
                info['generate_warmup_s'] = time.perf_counter() - t
                got = generate(model, pl, a.new_tokens, temperature=0, compile=True, cache=gcache)
                info['generate_graph_agrees_with_step'] = sum(x == y for x, y in zip(got, toks[0].tolist())) / toks.shape[1]  # first tokens: same
                info['generate_first_tokens'] = got[:32]
                with torch.no_grad():  # grad mode as generate runs it (another mode would recompile the prefill inside the timing)
                    fast_prefill(model, prompt, gcache, compile=True); torch.cuda.synchronize()
                    t = time.perf_counter(); fast_prefill(model, prompt, gcache, compile=True); torch.cuda.synchronize(); t_pre = time.perf_counter() - t
                info['prefill_s'] = t_pre
                t = time.perf_counter(); generate(model, pl, a.new_tokens, temperature=0, compile=True, cache=gcache)
                torch.cuda.synchronize(); t_all = time.perf_counter() - t
                info['generate_tokens_per_s'] = a.new_tokens / t_all           # whole call, prefill included
                info['generate_decode_tokens_per_s'] = (a.new_tokens - 1) / (t_all - t_pre)
                info['generate_achieved_GB_per_s'] = info['weight_bytes_read_per_token'] * info['generate_decode_tokens_per_s'] / 1e9
                del gcache
            if device.type == 'cuda': info['peak_mem_GiB'] = torch.cuda.max_memory_allocated(device) / 2**30
            step = cache = None
        except Exception as e:  # keep the other variants' numbers
            info['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
        results['variants'][name] = info
        save_json(a.out, results)  # after each variant: a run cut short keeps what it measured
        del model
        if device.type == 'cuda': torch.cuda.empty_cache()
        msg = info.get('error') or ((f"{info['tokens_per_s']:9.1f} tok/s  {info['ms_per_token']:7.3f} ms/token  "
                                     f"{info['achieved_GB_per_s']:7.1f} GB/s" if 'tokens_per_s' in info else '')
                                    + f"  {info['weight_bytes'] / 2**30:6.3f} GiB weights"
                                    + (f"  | generate (graphs): {info['generate_tokens_per_s']:9.1f} tok/s with prefill" if 'generate_tokens_per_s' in info else '')
                                    + (f"  | generate (graphs): {info['generate_decode_tokens_per_s']:9.1f} tok/s decode, "
                                       f"{info['generate_achieved_GB_per_s']:7.1f} GB/s" if 'generate_decode_tokens_per_s' in info else ''))
        print(f'{name:16s} {msg}', flush=True)

    b = results['variants'].get('bf16', {})
    for name, info in results['variants'].items():
        if 'tokens_per_s' in info and 'tokens_per_s' in b: info['speedup_vs_bf16'] = info['tokens_per_s'] / b['tokens_per_s']
        if 'generate_decode_tokens_per_s' in info and 'generate_decode_tokens_per_s' in b:
            info['generate_speedup_vs_bf16'] = info['generate_decode_tokens_per_s'] / b['generate_decode_tokens_per_s']
    sp = [f"{n} " + ', '.join(([f"{i['speedup_vs_bf16']:.2f}x (step)"] if 'speedup_vs_bf16' in i else []) +
                              ([f"{i['generate_speedup_vs_bf16']:.2f}x (generate)"] if 'generate_speedup_vs_bf16' in i else []))
          for n, i in results['variants'].items() if 'speedup_vs_bf16' in i or 'generate_speedup_vs_bf16' in i]
    if sp: print('speed-up vs bf16: ' + '; '.join(sp))
    save_json(a.out, results)
    print('wrote', a.out)
    return 0 if check['greedy_match_fp32'] and not any('error' in i for i in results['variants'].values()) else 1


if __name__ == '__main__':
    sys.exit(main())
