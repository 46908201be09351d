#!/usr/bin/env python3
"""Batch-1 decode speed of metai (`metai.infer.generate`, compiled decode step in a CUDA graph) against transformers
`generate` and gpt-fast on the same random bf16 weights, measured in one run on one GPU; and MLA's absorbed decode
against the naive one (the latent cache re-expanded into per-head keys and values at every step) at long context,
and with --dsa-topk DeepSeek-V3.2's sparse attention (a lightning indexer in every layer) against both.

Models (random init, bf16):
  llama-125m    Llama-shaped: dim 768, 12 layers, 12 heads (MHA), FFN 2048, vocab 32000, untied head
  llama-1b      Llama-shaped: dim 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab 128256, untied head
  small-moe     metai's `small` preset (GQA, 8 experts top-2, softmax router, tied head)
  deepseek-mla  DeepSeek-V2-Lite-shaped, 12 layers: dim 2048, 16 heads, MLA (q latent 1536, kv latent 512,
                nope/rope/v 128/64/128), first layer dense (FFN 10944), then 64 routed experts top-6 + 2 shared of
                width 1408 (sigmoid router), vocab 102400; context 33K for the long-context measurement

Each model: a 64-token random prompt, 256 new tokens sampled at temperature 0.8, top-k 200 (gpt-fast's defaults),
no stop token; metai eager, compiled (decode step in a CUDA graph, batch-1 products in metai's Triton kernels of
notebook 09b), compiled without those kernels (`kernels=False`: PyTorch's products) and compiled with inductor freezing (weights
folded into the step, so q/k/v and w1/w3 become single matmuls, as gpt-fast's fused wqkv); tokens/s = new tokens / wall time of the whole call (prefill included, gpt-fast's definition) after
warm-up, median of --runs calls, with `torch.cuda.synchronize` around each call; `decode_tokens_per_s` leaves the
(separately timed) prefill out. Baselines in the same run on the same weights: transformers `generate`
(`metai.model.hf.hf_model`, SDPA attention, its default dynamic cache; none for `small-moe`, which has no
transformers architecture) and gpt-fast, when a checkout is given with --gpt-fast-dir (its `model.py` and
`generate.py` are imported from there and run as its `main()` runs them: `decode_one_token` compiled with
mode="reduce-overhead", fullgraph=True; Llama-shaped models only). Inductor runs with gpt-fast's settings
(coordinate-descent tuning) for both. The HBM bound is weight bytes / the card's datasheet bandwidth (3.35e12 B/s
for an H100 SXM, 4.8e12 for an H200; a device-to-device copy is also timed, as the measured ceiling), reported for all
weights (the issue's definition) and for the bytes a decode step actually reads (no input embedding table, only
the activated experts).

    python scripts/bench_decode.py --out bench/results/decode_h100.json --gpt-fast-dir ~/gpt-fast
    python scripts/bench_decode.py --models llama-1b --runs 5 --out /tmp/1b.json
    python scripts/bench_decode.py --device cpu --tiny --out /tmp/decode_cpu.json      # a quick check of the script
"""
import os, sys, time, copy, argparse, inspect, importlib.util, statistics, contextlib, dataclasses
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, save_json, free, peak_mem_gb, short_error, sync, profile_fn
import torch
from metai.core import get_device, seed_everything
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.model.moe import MoE
from metai.model.dsa import Indexer
from metai.infer.cache import make_cache, set_mla_mode, cache_bytes
from metai.infer.generate import generate, fast_prefill, decode_n_tokens, graph_decoder, clear_graphs
from metai.infer.quant import quantize_model, prepare_int4
from metai.infer import kernels as metai_kernels

DATASHEET_HBM = {'H100': 3.35e12, 'H200': 4.8e12}  # bytes/s of the SXM parts


def hbm_bandwidth(device) -> float:
    "Datasheet HBM bandwidth of the card (an H100's when it is not known)."
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else ''
    return next((v for k, v in DATASHEET_HBM.items() if k in name), 3.35e12)


def copy_bandwidth(device, nbytes:int=2 << 30) -> float|None:
    "Measured device-to-device copy bandwidth (bytes read + written per second), median of 10 copies of `nbytes`."
    if device.type != 'cuda': return None
    a = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(); b = torch.empty_like(a)
    for _ in range(3): b.copy_(a)
    ts = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); b.copy_(a); e.record(); e.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
    del a, b; torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(ts)


def configs(tiny:bool) -> dict:
    "name -> ModelConfig of the benchmarked models (`tiny`: toy sizes that run in seconds on a CPU)."
    c = {'llama-125m': ModelConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq_len=2048,
                                   rope_interleaved=True, norm_eps=1e-5, tie_embeddings=False),
         'llama-1b': ModelConfig(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
                                 max_seq_len=2048, rope_interleaved=True, norm_eps=1e-5, tie_embeddings=False),
         'small-moe': ModelConfig.preset('small'),
         'deepseek-mla': ModelConfig(vocab_size=102400, dim=2048, n_layers=12, n_heads=16, attn_type='mla', q_lora_rank=1536,
                                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, ffn_dim=10944,
                                     n_routed_experts=64, n_activated_experts=6, n_shared_experts=2, moe_ffn_dim=1408,
                                     n_dense_layers=1, score_func='sigmoid', route_scale=1.0, rope_interleaved=True,
                                     max_seq_len=33280, tie_embeddings=False)}
    if tiny:
        t = dict(vocab_size=512, dim=64, n_layers=2, ffn_dim=128)
        c = {'llama-125m': ModelConfig(**t, n_heads=4, max_seq_len=256, rope_interleaved=True, norm_eps=1e-5),
             'llama-1b': ModelConfig(**t, n_heads=4, n_kv_heads=2, max_seq_len=256, rope_interleaved=True, norm_eps=1e-5),
             'small-moe': ModelConfig.preset('small', **t, n_heads=4, n_kv_heads=2, moe_ffn_dim=32, max_seq_len=256),
             'deepseek-mla': ModelConfig(**t, n_heads=4, attn_type='mla', q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                                         qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_activated_experts=2,
                                         n_shared_experts=1, moe_ffn_dim=32, n_dense_layers=1, score_func='sigmoid',
                                         rope_interleaved=True, max_seq_len=512)}
    return {k: v.validate() for k, v in c.items()}


def weight_bytes(model) -> int:
    "Bytes of all unique parameters (a tied embedding/head once)."
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bytes_per_token(model) -> int:
    "Bytes a batch-1 decode step reads: every weight but the input embedding table (one row of it), and only the top-k of E routed experts."
    tied = model.head.weight is model.embed.weight
    frac = {id(p): m.topk / m.n_experts for m in model.modules() if isinstance(m, MoE) for p in (m.w1, m.w2, m.w3)}
    skip = set() if tied else {id(model.embed.weight)}
    skip |= {id(p) for p in model.mtp.parameters()}
    return int(sum(p.numel() * p.element_size() * frac.get(id(p), 1.0) for p in model.parameters() if id(p) not in skip))


def wall(fn, device) -> float:
    sync(device); t0 = time.perf_counter(); fn(); sync(device)
    return time.perf_counter() - t0


def round8(n:int) -> int: return -(-n // 8) * 8


def tile_choices() -> dict:
    """The tiles this process's product kernels run: the autotuner's pick per shape key (N0, N1, N, K, PDL[, G]) for
    `gemv` and `gemv_int4`, and the fixed tile that `gemv` uses for long rows. A decode figure depends on them."""
    if metai_kernels.triton is None: return {}
    out = dict(long_tile=getattr(metai_kernels, '_LONG_TILE', None))
    for name, kern in (('gemv', metai_kernels.gemv_kernel), ('gemv_int4', metai_kernels.gemv_int4_kernel)):
        tuned = metai_kernels._TUNED.get(kern)
        if tuned is not None: out[name] = {str(k[:6]): str(c) for k, c in getattr(tuned, 'cache', {}).items()}
    return out


def add_ratios(r:dict, compile:bool):
    "The best metai row of model result `r`, its fraction of the HBM bound and its ratios to the baselines (in place)."
    keys = ['metai_compiled', 'metai_compiled_frozen', 'metai_compiled_sample_kernel', 'metai_compiled_attn_merge', 'metai_compiled_product_tiles', 'metai_compiled_switched', 'metai_eager'] + [k for k in r if k.startswith('metai_compiled_chunk')]
    best = max([r.get(k, {}).get('tokens_per_s') or 0 for k in keys])
    if not best: return
    r['best_metai_tokens_per_s'] = best
    r['fraction_of_hbm_bound'] = best / r['hbm_bound_tokens_per_s']
    for k in ('transformers', 'gpt_fast', 'metai_compiled_unfused', 'metai_eager' if compile else None):
        if k and r.get(k, {}).get('tokens_per_s'): r[f'speedup_vs_{k}'] = best / r[k]['tokens_per_s']
    int4 = max([r.get(k, {}).get('tokens_per_s') or 0 for k in ('metai_compiled_int4', 'metai_compiled_int4_gemv')])
    if int4 and r.get('metai_compiled', {}).get('tokens_per_s'):
        r['int4_speedup_vs_bf16'] = int4 / r['metai_compiled']['tokens_per_s']  # the faster int4 path


class CountingStream:
    "A streamer that only counts the tokens `generate` hands it: the host reads every replay, as `metai generate` and `chat` do."
    def __init__(self): self.n = 0
    def put(self, t): self.n += 1
    def end(self): pass

def bench_metai(model, prompt:list, n_new:int, compile:bool, runs:int, device, freeze:bool=False, chunk:int|None=None,
                kernels:bool=True, profile:bool=False, trace:str|None=None, streamed:bool=False) -> dict:
    "metai `generate` (sampling, no stop token) with a persistent static cache, after warm-up; `chunk` steps per CUDA graph."
    cache = make_cache(model, 1, round8(len(prompt) + n_new), mtp=False)  # reused: the CUDA graphs keep its addresses
    kw = dict(temperature=0.8, top_k=200, compile=compile, freeze=freeze, cache=cache, chunk=chunk, kernels=kernels,
              stream=CountingStream() if streamed else None)
    t_first = wall(lambda: generate(model, prompt, n_new, **kw), device)  # compiles and records
    generate(model, prompt, n_new, **kw)
    out = []
    ts = [wall(lambda: out.append(generate(model, prompt, n_new, seed=r, **kw)), device) for r in range(runs)]
    x = torch.tensor([prompt], device=device)
    with torch.no_grad():
        tp = statistics.median(wall(lambda: fast_prefill(model, x, cache, compile=compile), device) for _ in range(3))  # as generate runs it
        tp_plain = statistics.median(wall(lambda: fast_prefill(model, x, cache, compile=compile, graph=False), device) for _ in range(3))
    t = statistics.median(ts)
    assert all(len(o) == n_new for o in out), [len(o) for o in out]
    r = dict(tokens_per_s=n_new / t, decode_tokens_per_s=(n_new - 1) / (t - tp), prefill_ms=tp * 1e3,
             prefill_ms_no_graph=tp_plain * 1e3,  # the compiled prefill launched from Python (generate's before the prefill graphs)
             first_call_s=t_first, runs_s=ts, peak_mem_gb=peak_mem_gb(device))
    if profile and device.type == 'cuda':  # kernels of one whole generate call (the graphs' kernels are listed one by one)
        r['profile'] = profile_fn(lambda: generate(model, prompt, n_new, seed=0, **kw), device, steps=1, top=25, trace=trace)
        r['profile']['kernel_us_per_token'] = r['profile']['kernel_ms_per_step'] * 1e3 / n_new
    return r


def bench_hf(model, prompt:list, n_new:int, runs:int, device) -> dict:
    "transformers `generate` on the same weights (SDPA attention, default dynamic cache), sampling like metai's run."
    from metai.model.hf import hf_model
    hf = hf_model(model, attn_implementation='sdpa')
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=True, temperature=0.8, top_k=200, pad_token_id=0)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)  # warm-up
        out = []
        ts = [wall(lambda: out.append(hf.generate(ids, max_new_tokens=n_new, min_new_tokens=n_new, **kw)), device) for _ in range(runs)]
    assert all(o.shape[1] == len(prompt) + n_new for o in out), [o.shape for o in out]
    del hf
    return dict(tokens_per_s=n_new / statistics.median(ts), runs_s=ts)


def load_gpt_fast(d:str):
    "gpt-fast's `model` and `generate` modules, imported from a checkout at `d` (run beside metai, never copied)."
    d = os.path.abspath(os.path.expanduser(d))
    for f in ('model.py', 'generate.py'):
        if not os.path.isfile(os.path.join(d, f)): raise FileNotFoundError(f'{os.path.join(d, f)}: missing (--gpt-fast-dir must be a gpt-fast checkout)')
    sys.path.insert(0, d)  # its generate.py imports `model` and `tokenizer` from beside it
    mods = []
    for name, f in (('model', 'model.py'), ('gpt_fast_generate', 'generate.py')):
        spec = importlib.util.spec_from_file_location(name, os.path.join(d, f))
        mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod)
        mods.append(mod)
    sys.path.remove(d)
    return mods


def bench_gpt_fast(gf_model, gf_gen, model, prompt:list, n_new:int, runs:int, compile:bool, device) -> dict:
    "gpt-fast's `generate` on metai's weights (its wqkv is the concatenation of wq, wk, wv; its RoPE is interleaved)."
    cfg = model.cfg
    if cfg.attn_type != 'gqa' or cfg.is_moe or not cfg.rope_interleaved: return dict(skipped='gpt-fast runs Llama-shaped dense models only')
    args = gf_model.ModelArgs(block_size=cfg.max_seq_len, vocab_size=cfg.vocab_size, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                              dim=cfg.dim, intermediate_size=cfg.ffn_dim, n_local_heads=cfg.kv_heads, rope_base=cfg.rope_theta,
                              norm_eps=cfg.norm_eps)
    assert args.head_dim == cfg.hd, (args.head_dim, cfg.hd)
    sd = {'tok_embeddings.weight': model.embed.weight, 'norm.weight': model.norm.weight, 'output.weight': model.head.weight}
    for i, l in enumerate(model.layers):
        a, f, p = l.attn, l.ffn, f'layers.{i}.'
        sd.update({p + 'attention.wq.weight': a.wq.weight, p + 'attention.wk.weight': a.wk.weight,  # its load hook builds wqkv
                   p + 'attention.wv.weight': a.wv.weight, p + 'attention.wo.weight': a.wo.weight,
                   p + 'feed_forward.w1.weight': f.w1.weight, p + 'feed_forward.w2.weight': f.w2.weight,
                   p + 'feed_forward.w3.weight': f.w3.weight, p + 'attention_norm.weight': l.attn_norm.weight,
                   p + 'ffn_norm.weight': l.ffn_norm.weight})
    with torch.device('meta'): gm = gf_model.Transformer(args)
    gm.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, assign=True)
    gm = gm.eval()
    x = torch.tensor([prompt], device=device)
    with torch.no_grad():
        with torch.device(device): gm.setup_caches(max_batch_size=1, max_seq_length=len(prompt) + n_new)
        diff = (gm(x.int(), torch.arange(len(prompt), device=device)).float() - model(x)[0].float()).abs().max().item()
    if compile: gf_gen.decode_one_token = torch.compile(gf_gen.decode_one_token, mode='reduce-overhead', fullgraph=True)
    kw = dict(interactive=False, draft_model=None, temperature=0.8, top_k=200)
    if 'batch_size' in inspect.signature(gf_gen.generate).parameters: kw['batch_size'] = 1
    pt = torch.tensor(prompt, device=device, dtype=torch.int)
    with torch.no_grad():
        t_first = wall(lambda: gf_gen.generate(gm, pt, n_new, **kw), device)
        gf_gen.generate(gm, pt, n_new, **kw)
        ts = [wall(lambda: gf_gen.generate(gm, pt, n_new, **kw), device) for _ in range(runs)]
    del gm
    return dict(tokens_per_s=n_new / statistics.median(ts), first_call_s=t_first, runs_s=ts, max_abs_logit_diff_vs_metai=diff)


def dsa_indexers(model, topk:int) -> tuple:
    "DeepSeek-V3.2's indexer shape (64 heads of 128, top-`topk`) for `model`'s MLA: its config and one random indexer per layer."
    c32 = dataclasses.replace(model.cfg, index_n_heads=64, index_head_dim=128, index_topk=topk)
    p = model.embed.weight
    with torch.device(p.device): idx = [Indexer(c32, l.attn.layer_id).to(p.dtype).eval() for l in model.layers]
    return c32, idx


def bench_mla_modes(model, contexts:list, n_steps:int, compile:bool, device, saved=lambda res: None, dsa_topk:int=0) -> dict:
    """Decode steps at a filled context of each length: absorbed MLA (attention on the latents) against naive (re-expanded),
    and with `dsa_topk` DeepSeek-V3.2's sparse attention: the same model with a random lightning indexer in every layer,
    each step attending to the `dsa_topk` keys its indexer picks (absorbed mode, the selected latents gathered).
    `saved(res)` is called after each measurement, so that a run cut short keeps what it measured."""
    cfg, res = model.cfg, {}
    c32, idx = dsa_indexers(model, dsa_topk) if dsa_topk else (None, [])
    for ctx in contexts:
        S = round8(ctx + n_steps + 8)
        if S > cfg.max_seq_len: res[str(ctx)] = dict(skipped=f'context {S} > max_seq_len {cfg.max_seq_len}'); continue
        cache = make_cache(model, 1, S, mtp=False)
        for a, b in zip(cache.a, cache.b): a[:, :ctx].normal_(); b[:, :ctx].normal_()  # the cost depends on the length, not the content
        r = dict(latent_cache_bytes=cache_bytes(cfg, ctx, cache.a[0].dtype, 'mla', mtp=False),
                 expanded_cache_bytes=cache_bytes(cfg, ctx, cache.a[0].dtype, 'mha', mtp=False))
        for mode in ('absorbed', 'naive') + (('dsa',) if dsa_topk else ()):
            set_mla_mode(model, 'absorbed' if mode == 'dsa' else mode)
            if mode == 'dsa':  # the indexers in, and a cache with their keys (filled like the latents)
                for l, ix in zip(model.layers, idx): l.attn.indexer = ix
                del cache; free(device)
                cache = make_cache(c32, 1, S, device, model.embed.weight.dtype, mtp=False)
                for t in cache.a + cache.b + cache.c: t[:, :ctx].normal_()
                r.update(dsa_topk=dsa_topk, dsa_cache_bytes=cache_bytes(c32, ctx, cache.a[0].dtype, 'mla', mtp=False))
            tok, pos = torch.zeros(1, 1, dtype=torch.long, device=device), torch.tensor([ctx], device=device)
            try:
                with torch.no_grad():
                    if compile:  # metai generate's path: n_steps decode steps captured in one CUDA graph
                        dec = graph_decoder(model, cache, 1, n_steps, (0.8, 200, None, 1.0))
                        run = lambda: dec(tok, pos.fill_(ctx))
                    else: run = lambda: decode_n_tokens(model, tok, pos.fill_(ctx), cache, torch.empty(1, n_steps, dtype=torch.long, device=device), None, 0.8, 200)
                    run(); run()                                     # warm-up: compiles and captures
                    dt = statistics.median(wall(run, device) for _ in range(3))
                r[mode] = dict(tokens_per_s=n_steps / dt, ms_per_token=dt / n_steps * 1e3, peak_mem_gb=peak_mem_gb(device))
            except Exception as e: r[mode] = dict(error=short_error(e))
            finally:
                for l in model.layers: l.attn.indexer = None
            print(f'  MLA {mode:8s} at {ctx:6d}: {r[mode].get("ms_per_token", 0):.3f} ms per token {r[mode].get("error", "")}', flush=True)
            res[str(ctx)] = r; saved(res)
        if 'tokens_per_s' in r['absorbed'] and 'tokens_per_s' in r['naive']:
            r['absorbed_speedup'] = r['absorbed']['tokens_per_s'] / r['naive']['tokens_per_s']
        if 'tokens_per_s' in r.get('dsa', {}) and 'tokens_per_s' in r['absorbed']:
            r['dsa_speedup'] = r['dsa']['tokens_per_s'] / r['absorbed']['tokens_per_s']
        res[str(ctx)] = r
        del cache; free(device)
    set_mla_mode(model, None)
    return res


def bench_int4(model, prompt:list, n_new:int, runs:int, device, triton_gemv:bool=False) -> dict:
    """`bench_metai` on an int4 copy of `model` (G = 64, head included, `prepare_int4` layouts): the products in PyTorch's
    int4 kernel, or with `triton_gemv` in `gemv_int4` (notebook 09b's `INT4_IN_DECODE`)."""
    m4 = copy.deepcopy(model)
    quantize_model(m4, group_size=64, include_head=True); prepare_int4(m4, device)
    keep, metai_kernels.INT4_IN_DECODE = metai_kernels.INT4_IN_DECODE, triton_gemv
    clear_graphs(); torch._dynamo.reset()  # no graph or compiled step of another row reused, nor a recompile inside a timed call
    try:
        r = bench_metai(m4, prompt, n_new, True, runs, device)
        r.update(weight_bytes=sum(t.numel() * t.element_size() for t in m4.state_dict().values()), group_size=64, include_head=True,
                 products='gemv_int4 (Triton)' if triton_gemv else "PyTorch's int4 kernel")
    finally:
        metai_kernels.INT4_IN_DECODE = keep
        clear_graphs(); torch._dynamo.reset(); del m4; free(device)  # its graphs hold it
    return r


def bench_switched(model, prompt:list, n_new:int, runs:int, device, **switches) -> dict:
    "`bench_metai`'s compiled path with notebook 09b's switches set (e.g. SAMPLE_KERNEL=True, ATTN_MERGE=True), then restored."
    clear_graphs(); torch._dynamo.reset()  # the graphs and compiled steps so far hold the other paths (a guard failure mid-timing would recompile)
    keep = {k: getattr(metai_kernels, k) for k in switches}
    for k, v in switches.items(): setattr(metai_kernels, k, v)
    try: r = bench_metai(model, prompt, n_new, True, runs, device)
    finally:
        for k, v in keep.items(): setattr(metai_kernels, k, v)
        clear_graphs(); torch._dynamo.reset()
    return dict(r, switches=switches)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', required=True, help='JSON results file (written after each model)')
    ap.add_argument('--device', default=None, help='cuda (default when available) or cpu')
    ap.add_argument('--tiny', action='store_true', help='toy model sizes: a quick check that the script runs')
    ap.add_argument('--models', default='llama-125m,llama-1b,small-moe,deepseek-mla', help='comma-separated subset')
    ap.add_argument('--prompt-len', type=int, default=64)
    ap.add_argument('--new-tokens', type=int, default=256)
    ap.add_argument('--runs', type=int, default=3, help='timed calls per measurement (the median is reported)')
    ap.add_argument('--gpt-fast-dir', default=None, help='a gpt-fast checkout to measure beside metai')
    ap.add_argument('--no-hf', action='store_true', help='skip the transformers baseline')
    ap.add_argument('--no-eager', action='store_true', help='skip metai without compile')
    ap.add_argument('--no-chunk1', action='store_true', help='skip metai compiled with one decode step per CUDA graph')
    ap.add_argument('--streamed', action='store_true', help='also time metai compiled with a streamer (the host reads every replay, as the CLI does)')
    ap.add_argument('--chunks', default='', help='also time metai compiled with these decode steps per CUDA graph (comma-separated; the default is 8)')
    ap.add_argument('--profile', action='store_true', help="also profile one generate call of metai's default compiled path")
    ap.add_argument('--int4', action='store_true', help='also decode an int4 copy (group size 64, head included) through the same path')
    ap.add_argument('--int4-kernels', default='torch,gemv', help="with --int4: which products (torch: PyTorch's int4 kernel, gemv: gemv_int4)")
    ap.add_argument('--trace', default=None, help="with --profile: write the profiled call's timeline to this Chrome trace file")
    ap.add_argument('--sample-kernel', action='store_true', help="also time metai compiled with top-k draws in two Triton kernels (`topk_sample`) instead of torch.topk")
    ap.add_argument('--attn-merge', action='store_true', help="also time metai compiled with each head's attention splits merged by the last of them (no combine kernel)")
    ap.add_argument('--product-tiles', action='store_true', help="also time metai compiled with each long product's own best tile (PRODUCT_TILES) instead of _LONG_TILE")
    ap.add_argument('--no-unfused', action='store_true', help="skip metai compiled without its batch-1 kernels (PyTorch's products)")
    ap.add_argument('--no-freeze', action='store_true', help='skip metai compiled with inductor freezing (weights folded, q/k/v fused)')
    ap.add_argument('--compile', choices=['auto', 'on', 'off'], default='auto', help='compile decode steps (auto: on CUDA)')
    ap.add_argument('--mla-contexts', default='4096,32768', help='contexts for absorbed vs naive MLA decode ("" to skip)')
    ap.add_argument('--mla-only', action='store_true', help='only the absorbed vs naive MLA measurement (no generate rows)')
    ap.add_argument('--dsa-topk', type=int, default=0, help="with --mla-contexts: also decode with DeepSeek-V3.2's sparse attention, this many keys per step (V3.2: 2048; 0 = skip)")
    ap.add_argument('--layers', type=int, default=None, help='override every model\'s layer count (a shorter model compiles faster; the per-layer costs stay)')
    ap.add_argument('--mla-steps', type=int, default=64, help='decode steps timed at each context')
    a = ap.parse_args()
    device = get_device(a.device)
    compile = a.compile == 'on' or (a.compile == 'auto' and device.type == 'cuda')
    cfgs = configs(a.tiny)
    names = [n for n in a.models.split(',') if n]
    for n in names:
        if n not in cfgs: ap.error(f'--models: unknown model {n!r} (valid: {", ".join(cfgs)})')
    if a.trace and not a.profile: ap.error('--trace: needs --profile (the trace is of the profiled call)')
    if set(a.int4_kernels.split(',')) - {'torch', 'gemv'}: ap.error(f'--int4-kernels: {a.int4_kernels!r}: use torch, gemv or both, comma-separated')
    contexts = [int(c) for c in a.mla_contexts.split(',') if c]
    if a.tiny:
        a.prompt_len, a.new_tokens, a.runs, a.mla_steps = min(a.prompt_len, 8), min(a.new_tokens, 16), min(a.runs, 2), min(a.mla_steps, 8)
        contexts = [c for c in (64, 256) if contexts]
        a.dsa_topk = min(a.dsa_topk, 32)  # sparse at the toy contexts too
    torch._dynamo.config.cache_size_limit = 64           # one graph per model, MLA mode and context
    torch._dynamo.config.accumulated_cache_size_limit = 512
    torch._inductor.config.coordinate_descent_tuning = True  # gpt-fast's settings, for both
    torch._inductor.config.triton.unique_kernel_names = True
    torch._inductor.config.fx_graph_cache = True
    gf = load_gpt_fast(a.gpt_fast_dir) if a.gpt_fast_dir else None
    dtype = torch.bfloat16
    HBM = hbm_bandwidth(device)
    res = dict(card=card_info(device), copy_bytes_per_s=copy_bandwidth(device), settings=dict(vars(a), compile=compile, dtype=str(dtype), hbm_bytes_per_s=HBM,
                                                      sampling='temperature 0.8, top-k 200'), models={}, mla_modes={})
    for name in names:
        cfg = cfgs[name]
        if a.mla_only and cfg.attn_type != 'mla': continue  # nothing to measure for it
        if a.layers: cfg = ModelConfig(**{**cfg.to_dict(), 'n_layers': a.layers}).validate()
        seed_everything(0)
        with torch.device(device): model = Transformer(cfg)
        model = model.to(dtype).eval(); model.init_freqs()  # RoPE tables stay fp32
        wb, rb = weight_bytes(model), bytes_per_token(model)
        r = dict(config=cfg.to_dict(), params=model.num_params(), weight_bytes=wb, read_bytes_per_token=rb,
                 hbm_bound_tokens_per_s=HBM / wb, hbm_bound_read_tokens_per_s=HBM / rb)
        prompt = torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        print(f'{name}: {r["params"] / 1e6:,.0f}M params, {wb / 1e9:.2f} GB of weights, HBM bound {HBM / wb:,.0f} tokens/s', flush=True)
        # the main comparison first (metai's default path against gpt-fast), so that a run cut short keeps it
        root, ext = os.path.splitext(a.trace or '')
        trace = a.trace and (a.trace if len(names) == 1 else f'{root}_{name}{ext}')  # one file per model
        int4k = a.int4_kernels.split(',') if a.int4 else []
        switched = {k: True for k, on in (('SAMPLE_KERNEL', a.sample_kernel), ('ATTN_MERGE', a.attn_merge), ('PRODUCT_TILES', a.product_tiles)) if on}
        runs = [('metai_compiled', lambda: bench_metai(model, prompt, a.new_tokens, True, a.runs, device, profile=a.profile, trace=trace)) if compile else None,
                ('gpt_fast', lambda: bench_gpt_fast(*gf, model, prompt, a.new_tokens, a.runs, compile, device)) if gf else None,
                ('metai_compiled_switched', lambda: bench_switched(model, prompt, a.new_tokens, a.runs, device, **switched))
                if compile and len(switched) > 1 else None,  # all the switches together, before each alone: a run cut short keeps it
                ('metai_compiled_streamed', lambda: bench_metai(model, prompt, a.new_tokens, True, a.runs, device, streamed=True))
                if compile and a.streamed else None,
                *[(f'metai_compiled_chunk{c}', lambda c=c: bench_metai(model, prompt, a.new_tokens, True, a.runs, device, chunk=c))
                  for c in map(int, filter(None, a.chunks.split(','))) if compile and c not in (1, 8)],  # 8: metai_compiled; 1: the chunk1 row
                ('metai_compiled_int4', lambda: bench_int4(model, prompt, a.new_tokens, a.runs, device)) if compile and 'torch' in int4k else None,
                ('metai_compiled_int4_gemv', lambda: bench_int4(model, prompt, a.new_tokens, a.runs, device, triton_gemv=True))
                if compile and 'gemv' in int4k else None,
                ('metai_compiled_sample_kernel', lambda: bench_switched(model, prompt, a.new_tokens, a.runs, device, SAMPLE_KERNEL=True))
                if compile and a.sample_kernel else None,
                ('metai_compiled_attn_merge', lambda: bench_switched(model, prompt, a.new_tokens, a.runs, device, ATTN_MERGE=True))
                if compile and a.attn_merge else None,
                ('metai_compiled_product_tiles', lambda: bench_switched(model, prompt, a.new_tokens, a.runs, device, PRODUCT_TILES=True))
                if compile and a.product_tiles else None,
                ('metai_compiled_unfused', lambda: bench_metai(model, prompt, a.new_tokens, True, a.runs, device, kernels=False))
                if compile and not a.no_unfused else None,
                ('metai_compiled_frozen', lambda: bench_metai(model, prompt, a.new_tokens, True, a.runs, device, freeze=True))
                if compile and not a.no_freeze else None,
                ('metai_compiled_chunk1', lambda: bench_metai(model, prompt, a.new_tokens, True, a.runs, device, chunk=1))
                if compile and not a.no_chunk1 else None,
                ('metai_eager', lambda: bench_metai(model, prompt, a.new_tokens, False, a.runs, device)) if not a.no_eager else None,
                ('transformers', lambda: bench_hf(model, prompt, a.new_tokens, a.runs, device)) if not a.no_hf else None]
        for key, fn in filter(None, [] if a.mla_only else runs):
            t0 = time.perf_counter()
            try: r[key] = fn()
            except Exception as e: r[key] = dict(error=short_error(e))
            r[key]['row_s'] = time.perf_counter() - t0  # compile, autotune and timing together
            print(f'  {key:15s} {r[key].get("tokens_per_s", 0):10,.1f} tokens/s  ({r[key]["row_s"]:.0f} s)  '
                  f'{r[key].get("error", r[key].get("skipped", ""))}', flush=True)
            if device.type == 'cuda': torch.cuda.empty_cache()
            add_ratios(r, compile)
            r['tiles'] = tile_choices()  # autotuned so far in this process
            res['models'][name] = r
            save_json(a.out, res)  # after every row: a run cut short keeps what it measured
        res['models'][name] = r
        save_json(a.out, res)
        if cfg.attn_type == 'mla' and contexts:
            def saved(part, name=name): res['mla_modes'][name] = part; save_json(a.out, res)
            res['mla_modes'][name] = bench_mla_modes(model, contexts, a.mla_steps, compile, device, saved, a.dsa_topk)
            for ctx, m in res['mla_modes'][name].items():
                print(f'  MLA at {ctx}: absorbed {m.get("absorbed", {}).get("tokens_per_s", 0):,.1f} tokens/s, '
                      f'naive {m.get("naive", {}).get("tokens_per_s", 0):,.1f} tokens/s'
                      + (f', DSA top-{a.dsa_topk} {m.get("dsa", {}).get("tokens_per_s", 0):,.1f} tokens/s' if a.dsa_topk else ''), flush=True)
            save_json(a.out, res)
        del model; free(device)
    print(f'wrote {a.out}')


if __name__ == '__main__': main()
