#!/usr/bin/env python3
"""Forward + backward throughput of metai models in bf16 autocast with torch.compile, against transformers'
`DeepseekV3ForCausalLM` on the same config and weights, measured in one run on one GPU.

Models: metai `gpt2` (dense), `small` (softmax-routed MoE) and `ds-mla`, a DeepSeek-shaped small MoE with MLA
(hidden 768, 12 layers, 12 heads, 8 routed experts top-2 + 1 shared of width 512, first layer dense with FFN 2048,
MLA q/kv ranks 384/256, nope/rope/v 64/32/64, vocab 32000; 194M parameters). The same `ds-mla` weights are loaded
into transformers (`metai.model.hf.hf_model`, SDPA attention, transformers' default `grouped_mm` experts) and timed
eager with fp32 weights under autocast (metai's regime), eager with bf16 weights, and compiled with bf16 weights
(its grouped_mm falls back to an uncompilable Python loop for fp32 weights under torch.compile). Each step is
`loss = model(x, y); loss.backward()`; tokens/s from the median of CUDA-event-timed steps after warm-up;
MFU = `cfg.flops_per_token(T, training=True)` * tokens/s / 989 TFLOP/s.

    python scripts/bench_model.py --device cuda --out bench/results/model_h100.json
    python scripts/bench_model.py --device cpu --tiny --out /tmp/model_cpu.json     # a quick check of the script
"""
import os, sys, time, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (PEAK_BF16, compile_mode, card_info, set_matmul_precision, time_fn, profile_fn, Budget, save_json, free,
                          peak_mem_gb, short_error, sync)
import torch
import torch.nn.functional as F
from metai.core import get_device, autocast, seed_everything
from metai.config import ModelConfig
from metai.model.transformer import Transformer

TINY = dict(vocab_size=512, dim=64, n_layers=2, ffn_dim=128, max_seq_len=64)


def ds_mla_config(tiny:bool=False) -> ModelConfig:
    "The DeepSeek-shaped small MoE with MLA of the transformers reference measurement (no aux loss: transformers has none)."
    c = dict(vocab_size=32000, dim=768, n_layers=12, n_heads=12, attn_type='mla', q_lora_rank=384, kv_lora_rank=256,
             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, ffn_dim=2048, n_routed_experts=8,
             n_shared_experts=1, n_activated_experts=2, moe_ffn_dim=512, n_dense_layers=1, score_func='sigmoid',
             n_expert_groups=1, n_limited_groups=1, route_scale=1.0, aux_loss_alpha=0.0, bias_update_speed=0.0,
             rope_interleaved=True, max_seq_len=1024, tie_embeddings=False, norm_eps=1e-6)
    if tiny: c.update(TINY, n_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                      v_head_dim=16, moe_ffn_dim=32)
    return ModelConfig(**c).validate()


def preset_config(name:str, tiny:bool=False) -> ModelConfig:
    if not tiny: return ModelConfig.preset(name)
    extra = dict(n_heads=4, n_kv_heads=2, moe_ffn_dim=32) if name == 'small' else dict(n_heads=2)
    return ModelConfig.preset(name, **TINY, **extra)


def batch(cfg:ModelConfig, B:int, T:int, device, seed:int=0):
    "Random tokens (B, T+1) cut into inputs and next-token targets."
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    return t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)


def metai_loss(model):
    "The loss of a metai model (compiled or not) called as `metai.train.loop` calls it: `_, loss, aux = model(x, y, loss_only=True)`."
    return lambda x, y: model(x, y, loss_only=True)[1]


def fwd_bwd(loss_fn, params_owner, x, y, device):
    "One benchmark step: forward with the loss, backward, gradients dropped (set to None, as after a training step)."
    def step():
        with autocast(device): loss = loss_fn(x, y)
        loss.backward()
        params_owner.zero_grad(set_to_none=True)
    return step


def measure(name:str, loss_fn, owner, cfg:ModelConfig, x, y, device, args, compiled:bool, profile:bool, extra=None) -> dict:
    B, T = x.shape
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    step = fwd_bwd(loss_fn, owner, x, y, device)
    t = time_fn(step, device, args.warmup, args.iters)
    fpt = cfg.flops_per_token(T, training=True)
    tps = B * T / (t['median_ms'] / 1e3)
    r = dict(name=name, batch=B, seq_len=T, compiled=compiled, params=cfg.num_params(),
             active_params=cfg.active_params(embedding=False), flops_per_token=fpt, tokens_per_s=round(tps),
             mfu=round(fpt * tps / PEAK_BF16, 4) if device.type == 'cuda' else None, peak_mem_gb=peak_mem_gb(device),
             compile_and_first_step_s=t['first_call_s'], median_ms=round(t['median_ms'], 3), min_ms=round(t['min_ms'], 3),
             max_ms=round(t['max_ms'], 3), step_ms=t['ms'], **(extra or {}))
    if profile:
        try: r['profile'] = profile_fn(step, device, steps=2)
        except Exception as e: r['profile_error'] = short_error(e)
    print(f"{name:50s} {r['tokens_per_s']:>11,} tok/s  {r['median_ms']:8.2f} ms/step  "
          f"MFU {r['mfu'] if r['mfu'] is not None else float('nan'):.3f}  peak {r['peak_mem_gb']} GB  "
          f"(compile + first step {r['compile_and_first_step_s']} s)", flush=True)
    return r


def sdpa_mla_bench(device, tiny:bool, iters:int) -> list:
    "Causal SDPA forward + backward at the MLA shape (q/k 96, v 64) per backend, and GPT-2's shape (64/64) with flash."
    from torch.nn.attention import sdpa_kernel, SDPBackend
    B, H, T = (2, 2, 64) if tiny else (16, 12, 1024)
    dt = torch.bfloat16 if device.type == 'cuda' else torch.float32
    rows = []
    def run(label, dqk, dv, backends, pad_v=False):
        q, k = (torch.randn(B, H, T, dqk, device=device, dtype=dt, requires_grad=True) for _ in range(2))
        v = torch.randn(B, H, T, dv, device=device, dtype=dt, requires_grad=True)
        go = torch.randn(B, H, T, dv, device=device, dtype=dt)
        def step():
            vv = F.pad(v, (0, dqk - dv)) if pad_v else v
            if backends is None: o = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
            else:
                with sdpa_kernel(backends): o = F.scaled_dot_product_attention(q, k, vv, is_causal=True)
            o[..., :dv].backward(go)
        try:
            t = time_fn(step, device, warmup=2, iters=iters)
            flops = 3 * 2 * B * H * T * T * (dqk + dv) / 2  # fwd + bwd (3x) of the causal half, model convention
            rows.append(dict(variant=label, shape=[B, H, T, dqk, dv], median_ms=round(t['median_ms'], 3),
                             tflops=round(flops / (t['median_ms'] / 1e3) / 1e12, 1)))
        except Exception as e: rows.append(dict(variant=label, shape=[B, H, T, dqk, dv], error=short_error(e)))
        print(f"  sdpa {label:44s} {rows[-1].get('median_ms', rows[-1].get('error'))}", flush=True)
    run('MLA 96/64, default dispatch', 96, 64, None)
    run('MLA 96/64, memory-efficient', 96, 64, [SDPBackend.EFFICIENT_ATTENTION])
    run('MLA 96/64, cuDNN', 96, 64, [SDPBackend.CUDNN_ATTENTION])
    run('MLA 96/64, v zero-padded to 96, flash', 96, 64, [SDPBackend.FLASH_ATTENTION], pad_v=True)
    run('GPT-2 64/64, flash', 64, 64, [SDPBackend.FLASH_ATTENTION])
    return rows


def best_sdpa_backend(rows:list, margin:float=0.9) -> str|None:
    "The SDPBackend name of the fastest plain backend at the MLA shape, if it is clearly faster than the default dispatch."
    ms = {r['variant']: r['median_ms'] for r in rows if 'median_ms' in r}
    default = ms.get('MLA 96/64, default dispatch')
    cands = [(ms[v], b) for v, b in (('MLA 96/64, memory-efficient', 'EFFICIENT_ATTENTION'), ('MLA 96/64, cuDNN', 'CUDNN_ATTENTION'))
             if v in ms]
    if default is None or not cands: return None
    t, b = min(cands)
    return b if t < margin * default else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', help="'cuda' or 'cpu'")
    p.add_argument('--out', default='bench/results/model_h100.json', help='JSON results file (rewritten after each model)')
    p.add_argument('--tiny', action='store_true', help='toy sizes, to check the script on a CPU')
    p.add_argument('--no-compile', action='store_true', help='skip torch.compile (script check only)')
    p.add_argument('--models', default='ds-mla,hf,gpt2,small', help='comma list of: ds-mla, hf, gpt2, small, sdpa')
    p.add_argument('--ds-batch', type=int, default=16, help='sequences per step for ds-mla and transformers')
    p.add_argument('--batch', type=int, default=32, help='sequences per step for gpt2 and small')
    p.add_argument('--seq-len', type=int, default=1024, help='tokens per sequence')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps (the first compiles)')
    p.add_argument('--iters', type=int, default=10, help='timed steps')
    p.add_argument('--extra-modes', default='', help="comma list of torch.compile modes to also time ds-mla in (metai and transformers), e.g. reduce-overhead")
    p.add_argument('--extra-weights', default='float32,bfloat16', help="weight dtypes of metai's ds-mla rows in --extra-modes (comma list)")
    p.add_argument('--skip-eager', action='store_true', help='leave out the eager ds-mla rows')
    p.add_argument('--skip-bf16-default', action='store_true', help='leave out metai ds-mla with bf16 weights in the default compile mode')
    p.add_argument('--skip-default', action='store_true', help='leave out both metai ds-mla rows in the default compile mode')
    p.add_argument('--no-profile', action='store_true', help='skip the torch.profiler breakdown')
    p.add_argument('--time-budget', type=float, default=1e9, help='seconds; items that would not fit are skipped')
    args = p.parse_args(argv)
    device = get_device(args.device)
    set_matmul_precision(); seed_everything(0)
    bad = [w for w in args.extra_weights.split(',') if w not in ('float32', 'bfloat16')]
    if bad: p.error(f'--extra-weights: {", ".join(bad)} (float32 and/or bfloat16)')
    budget = Budget(args.time_budget)
    want = set(args.models.split(',')) | {'sdpa'}
    T = 64 if args.tiny else args.seq_len
    B_ds, B = (2, 2) if args.tiny else (args.ds_batch, args.batch)
    compile_ = (lambda f: f) if args.no_compile else torch.compile
    modes = [m for m in args.extra_modes.split(',') if m]
    res = dict(benchmark='model', what='forward + backward, bf16 autocast (fp32 weights)', peak_flops=PEAK_BF16,
               info=card_info(device), settings=dict(vars(args), seq_len=T, ds_batch=B_ds, batch=B, tf32=True),
               results=[], skipped=[], errors=[])
    profile = not args.no_profile
    print(f"card: {res['info']['card']}  torch {torch.__version__}  transformers {res['info'].get('transformers')}", flush=True)

    def save(): save_json(args.out, res)
    def skip(what, need):
        if budget.allows(need): return False
        res['skipped'].append(f'{what}: {budget.left():.0f} s left, needs about {need:.0f} s'); save(); return True

    # 1. SDPA at the MLA shape: which kernel attention gets when q/k and v head sizes differ
    if 'sdpa' in want and not skip('sdpa', 20):
        res['sdpa_mla'] = sdpa_mla_bench(device, args.tiny, 5 if args.tiny else 20); save()

    # 2. the DeepSeek-shaped model: metai compiled and eager, then transformers eager and compiled on the same weights
    if 'ds-mla' in want:
        cfg = ds_mla_config(args.tiny)
        res['ds_mla_config'] = cfg.to_dict()
        x, y = batch(cfg, B_ds, T, device)
        torch.manual_seed(0)
        model = Transformer(cfg).to(device).train()
        if not args.skip_default and not skip('metai ds-mla compiled', 100):
            try: res['results'].append(measure('metai ds-mla (compiled)', metai_loss(compile_(model)), model, cfg, x, y, device,
                                               args, not args.no_compile, profile, dict(impl='metai', model='ds-mla', weights='float32')))
            except Exception as e: res['errors'].append(f'metai ds-mla compiled: {short_error(e)}')
            save()
        torch._dynamo.reset()
        if not (args.skip_bf16_default or args.skip_default) and not skip('metai ds-mla compiled bf16', 100):  # pure bf16 weights, transformers' fastest setting below
            try:
                mb = Transformer(cfg).to(device).train(); mb.load_state_dict(model.state_dict()); mb.to(torch.bfloat16); mb.init_freqs()
                res['results'].append(measure('metai ds-mla (compiled, bf16 weights)', metai_loss(compile_(mb)), mb, cfg, x, y,
                                              device, args, not args.no_compile, profile,
                                              dict(impl='metai', model='ds-mla', weights='bfloat16')))
            except Exception as e: res['errors'].append(f'metai ds-mla compiled bf16: {short_error(e)}')
            mb = None; free(device); save()
        for mode in modes:  # the same two in another torch.compile mode (reduce-overhead: the step as CUDA graphs)
            rows = ((f'metai ds-mla (compiled {mode})', torch.float32), (f'metai ds-mla (compiled {mode}, bf16 weights)', torch.bfloat16))
            for label, dtype in [r for r in rows if str(r[1]).removeprefix('torch.') in args.extra_weights.split(',')]:
                torch._dynamo.reset()
                if skip(label, 100): continue
                try:
                    mb = Transformer(cfg).to(device).train(); mb.load_state_dict(model.state_dict()); mb.to(dtype); mb.init_freqs()
                    res['results'].append(measure(label, metai_loss(mb if args.no_compile else torch.compile(mb, mode=compile_mode(mode))), mb, cfg, x, y, device, args,
                                                  not args.no_compile, profile, dict(impl='metai', model='ds-mla', weights=str(dtype).removeprefix('torch.'),
                                                                      compile_mode=mode)))
                except Exception as e: res['errors'].append(f'{label}: {short_error(e)}')
                mb = None; free(device); save()
        torch._dynamo.reset()
        if not args.skip_eager and not skip('metai ds-mla eager', 20):
            try: res['results'].append(measure('metai ds-mla (eager)', metai_loss(model), model, cfg, x, y, device, args, False,
                                               False, dict(impl='metai', model='ds-mla', weights='float32')))
            except Exception as e: res['errors'].append(f'metai ds-mla eager: {short_error(e)}')
            save()
        hf = None
        if 'hf' in want and not skip('transformers', 40):
            try:
                from metai.model.hf import hf_model
                hf = hf_model(model, attn_implementation='sdpa').train()
                impl = dict(attn=getattr(hf.config, '_attn_implementation', None),
                            experts=getattr(hf.config, '_experts_implementation', None), type=type(hf).__name__)
                res['hf_impl'] = impl
                def hf_loss(m):
                    def f(x, y):  # the same loss metai computes: fp32 cross-entropy over all B*T positions
                        logits = m(input_ids=x, use_cache=False).logits
                        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                    return f
                with torch.no_grad(), autocast(device):  # same config and weights: the losses must agree
                    a, b = metai_loss(model)(x, y).item(), hf_loss(hf)(x, y).item()
                res['parity'] = dict(metai_loss=a, transformers_loss=b, abs_diff=abs(a - b),
                                     note='one batch, eval of the train-mode models in bf16 autocast')
                print(f"parity: metai loss {a:.5f}, transformers loss {b:.5f}", flush=True)
                del model; free(device)
                # transformers' grouped_mm is not autocast-aware: with fp32 weights under torch.compile it takes its Python
                # fallback, whose backward reads offsets on the host and cannot be compiled. So it runs eager in both
                # precisions, and compiled with bf16 weights (pure bf16: cheaper than metai's fp32 master weights).
                variants = [('transformers DeepseekV3 (eager)', False, torch.float32, 20),
                            ('transformers DeepseekV3 (eager, bf16 weights)', False, torch.bfloat16, 20),
                            ('transformers DeepseekV3 (compiled, bf16 weights)', True, torch.bfloat16, 130)]
                if args.skip_eager: variants = variants[2:]
                variants += [(f'transformers DeepseekV3 (compiled {mode}, bf16 weights)', mode, torch.bfloat16, 130) for mode in modes]
                for label, comp, dtype, need in variants:
                    if skip(label, need): continue
                    hf.to(dtype)
                    torch._dynamo.reset()
                    cmp = (lambda f: torch.compile(f, mode=compile_mode(comp))) if isinstance(comp, str) and not args.no_compile else compile_
                    try: res['results'].append(measure(label, cmp(hf_loss(hf)) if comp else hf_loss(hf), hf, cfg, x, y, device,
                                                       args, comp and not args.no_compile, comp and profile,
                                                       dict(impl='transformers', model='ds-mla', hf_impl=impl,
                                                            weights=str(dtype).removeprefix('torch.'),
                                                            **({'compile_mode': comp} if isinstance(comp, str) else {}))))
                    except Exception as e: res['errors'].append(f'{label}: {short_error(e)}')
                    save()
            except Exception as e: res['errors'].append(f'transformers: {short_error(e)}'); save()
        model = hf = None; free(device)

    # 3. metai gpt2 and small at the training benchmark's batch (their compiled graphs are then cached for it)
    for name in ('gpt2', 'small'):
        if name not in want or skip(f'metai {name}', 80): continue
        cfg = preset_config(name, args.tiny)
        x, y = batch(cfg, B, T, device)
        torch.manual_seed(0)
        model = Transformer(cfg).to(device).train()
        try: res['results'].append(measure(f'metai {name} (compiled)', metai_loss(compile_(model)), model, cfg, x, y, device, args, not args.no_compile, profile, dict(impl='metai', model=name)))
        except Exception as e: res['errors'].append(f'metai {name}: {short_error(e)}')
        model = None; free(device); save()

    # 4. a setting worth trying: the fastest SDPA backend at the MLA shape (from step 1), when it beats the default one
    best = best_sdpa_backend(res.get('sdpa_mla', []))
    if 'ds-mla' in want and best and not skip(f'metai ds-mla compiled with SDPA {best}', 100):
        from torch.nn.attention import sdpa_kernel, SDPBackend
        cfg = ds_mla_config(args.tiny)
        x, y = batch(cfg, B_ds, T, device)
        torch.manual_seed(0)
        model = Transformer(cfg).to(device).train()
        try:
            with sdpa_kernel([getattr(SDPBackend, best)]):
                res['results'].append(measure(f'metai ds-mla (compiled, SDPA {best.lower()})', metai_loss(compile_(model)), model,
                                              cfg, x, y, device, args, not args.no_compile, profile,
                                              dict(impl='metai', model='ds-mla', sdpa_backend=best)))
        except Exception as e: res['errors'].append(f'metai ds-mla with SDPA {best}: {short_error(e)}')
        model = None; free(device); save()

    # ratios against transformers on the same config, batch and weights
    by = {r['name']: r for r in res['results']}
    m = by.get('metai ds-mla (compiled)')
    hfc = by.get('transformers DeepseekV3 (compiled, bf16 weights)')
    for r in res['results']:  # every other compiled metai ds-mla row against transformers compiled (default mode) and in its own mode
        if r['impl'] != 'metai' or r['model'] != 'ds-mla' or not r['compiled'] or r is m: continue
        if hfc: res.setdefault('ratios', {})[f"{r['name']} vs {hfc['name']}"] = round(r['tokens_per_s'] / hfc['tokens_per_s'], 3)
        same = by.get(f"transformers DeepseekV3 (compiled {r.get('compile_mode')}, bf16 weights)")
        if same: res.setdefault('ratios', {})[f"{r['name']} vs {same['name']}"] = round(r['tokens_per_s'] / same['tokens_per_s'], 3)
    for k, key in (('transformers DeepseekV3 (compiled, bf16 weights)', 'metai_vs_transformers_compiled'),
                   ('transformers DeepseekV3 (eager)', 'metai_vs_transformers_eager'),
                   ('transformers DeepseekV3 (eager, bf16 weights)', 'metai_vs_transformers_eager_bf16')):
        if m and k in by: res.setdefault('ratios', {})[key] = round(m['tokens_per_s'] / by[k]['tokens_per_s'], 3)
    res['target'] = dict(metai_vs_transformers_compiled=1.5)
    res['elapsed_s'] = round(time.perf_counter() - budget.t0, 1)
    save()
    print(f"\n{'model':50s} {'tokens/s':>11s} {'MFU':>6s} {'peak GB':>8s}")
    for r in res['results']:
        print(f"{r['name']:50s} {r['tokens_per_s']:>11,} {r['mfu'] if r['mfu'] is not None else float('nan'):6.3f} {r['peak_mem_gb']!s:>8s}")
    for k, v in res.get('ratios', {}).items(): print(f'{k}: {v:.3f}x')
    for s in res['skipped'] + res['errors']: print('!', s)
    print(f"wrote {args.out} in {res['elapsed_s']} s")


if __name__ == '__main__':
    main()
