#!/usr/bin/env python3
"""What a speculative round's verification costs: one forward of T tokens of one row through the target's static
cache, as notebook 11's module path (`forward_step`) and as notebook 09b's `verify_forward` (`gemv_rows` products),
against the one-token decode step (`decode_forward`), each captured in a CUDA graph (no launch gaps), on random bf16
weights; then the kernels of one call of each under the profiler. A round that costs no more than a plain step is
what makes speculation pay (notebook 11).

    python scripts/bench_verify.py --out bench/results/verify_h200.json
    python scripts/bench_verify.py --device cpu --tiny --out /tmp/verify_cpu.json   # a quick check of the script
"""
import os, sys, copy, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, save_json, profile_fn, graph_us, short_error
import torch
from metai.core import get_device, seed_everything
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.infer.cache import make_cache, forward_step
from metai.infer.kernels import decode_forward, verify_forward, gemv_rows, mtp_rows_step, fold_norm_gains
import metai.infer.kernels as kernels
import metai.infer.speculative as spec

SHAPES = {  # the speculative benchmark's trained target, and issue 5's 1B Llama shape
    'spec-target': dict(vocab_size=8192, dim=2048, n_layers=16, n_heads=16, n_kv_heads=4, ffn_dim=8192),
    'spec-draft': dict(vocab_size=8192, dim=512, n_layers=2, n_heads=8, n_kv_heads=4, ffn_dim=1536),
    'llama-1b': dict(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192),
}

def switched(fn, name:str, value):
    "`fn` with `kernels.<name>` set to `value` (read when the kernels launch, so at capture; a compiled caller recompiles on it)."
    def f():
        old = getattr(kernels, name); setattr(kernels, name, value)
        try: return fn()
        finally: setattr(kernels, name, old)
    return f

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--device', default=None)
    ap.add_argument('--models', default='spec-target')
    ap.add_argument('--tokens', default='1,2,5', help='tokens per verification (γ+1)')
    ap.add_argument('--context', type=int, default=320, help='cache positions filled before the verification')
    ap.add_argument('--compiled-tokens', default='2,5', help='T for which the module path and verify_forward are also timed '
                    'compiled (`torch.compile`, as the speculative rounds run them; a compile each): the elementwise ops fuse')
    ap.add_argument('--mtp-round-gammas', default='', help='also time whole compiled MTP rounds (spec-target with one MTP module) '
                    'at these γ, with the module through `mtp_rows_step` and through `mtp_step`')
    ap.add_argument('--draft-round-gammas', default='', help='also time whole compiled draft-model rounds (spec-draft drafting for '
                    'spec-target) at these γ, with the first draft step through `verify_forward` and through `forward_step`')
    ap.add_argument('--few-rows', type=int, default=0, help='also time verifications of at most this many tokens (and the rounds) '
                    'with `gemv_few` (FEW_ROWS, notebook 09b) in place of the tensor-core products')
    ap.add_argument('--prologue-kernel', action='store_true', help='also time the compiled verifications, steps and rounds '
                    'with f(x) before each product in `rows_prologue` (PROLOGUE_KERNEL, notebook 09b) instead of inductor kernels')
    ap.add_argument('--fold-norms', action='store_true', help='also time the compiled verifications and the rounds with the RMSNorm '
                    'gains folded into the products (`fold_norm_gains`, notebook 09b: no norm kernels; a folded copy of each model)')
    ap.add_argument('--glu-rows', action='store_true', help="also time the compiled verifications and the rounds with SwiGLU's "
                    'silu(a) * b in the w1/w3 product (GLU_ROWS, notebook 09b), with and without --fold-norms')
    ap.add_argument('--round-temperatures', default='0', help='sampling temperatures of the whole rounds (0: greedy); each '
                    'round is also profiled, so a sampled round can be set against a greedy one kernel by kernel')
    ap.add_argument('--tiny', action='store_true')
    a = ap.parse_args()
    dev = get_device(a.device)
    res = dict(card=card_info(dev), settings=vars(a), models={})
    compiled_T = [int(t) for t in a.compiled_tokens.split(',') if t]
    for name in a.models.split(','):
        m = build(name, dev, a); kw = m.cfg.to_dict()
        cache = make_cache(m, 1, 1024, mtp=False)
        with torch.no_grad(): forward_step(m, torch.randint(0, kw['vocab_size'], (1, a.context), device=dev), torch.arange(a.context, device=dev), cache)
        r = res['models'][name] = dict(config=kw, params=m.num_params(), rows={})
        mf = fold_norm_gains(copy.deepcopy(m)) if a.fold_norms else None
        for T in [int(t) for t in a.tokens.split(',')]:
            tok = torch.randint(0, kw['vocab_size'], (1, T), device=dev)
            pos = torch.arange(a.context, a.context + T, device=dev)
            fns = dict(module=lambda: forward_step(m, tok, pos, cache), verify_forward=lambda: verify_forward(m, tok, pos, cache))
            fns['verify_forward, no PDL'] = switched(fns['verify_forward'], 'PDL', False)
            if T == 1: fns['decode_forward'] = lambda: decode_forward(m, tok, pos, cache)
            if dev.type == 'cuda' and T in compiled_T:
                cm, cv = torch.compile(forward_step, dynamic=False), torch.compile(verify_forward, dynamic=False)
                fns['module, compiled'] = lambda: cm(m, tok, pos, cache)
                fns['verify_forward, compiled'] = lambda: cv(m, tok, pos, cache)
                if a.prologue_kernel: fns['verify_forward, prologue kernel, compiled'] = switched(fns['verify_forward, compiled'], 'PROLOGUE_KERNEL', True)
                if mf is not None: fns['verify_forward, norms folded, compiled'] = lambda: cv(mf, tok, pos, cache)
                if a.glu_rows:
                    for k_ in [k_ for k_ in ('verify_forward, compiled', 'verify_forward, norms folded, compiled') if k_ in fns]:
                        fns[k_.replace(', compiled', ', glu rows, compiled')] = switched(fns[k_], 'GLU_ROWS', True)
                if T <= a.few_rows: fns['verify_forward, gemv_few, compiled'] = switched(fns['verify_forward, compiled'], 'FEW_ROWS', a.few_rows)
            if T <= a.few_rows: fns['verify_forward, gemv_few'] = switched(fns['verify_forward'], 'FEW_ROWS', a.few_rows)
            row = r['rows'][T] = {}
            for k, fn in fns.items():
                with torch.no_grad():
                    try: us = graph_us(fn) if dev.type == 'cuda' else None
                    except Exception as e: row[k] = dict(error=short_error(e)); print(f'{name} T={T} {k}: {row[k]["error"]}', flush=True); continue
                    prof = profile_fn(fn, dev, steps=2, top=8)
                row[k] = dict(graph_us=us, profile=prof)
                print(f'{name} T={T} {k:24s} graph {us or 0:9.1f} us  kernels {prof["kernel_ms_per_step"] * 1e3:9.1f} us  '
                      + '  '.join(f'{t["name"][:40]} {t["ms_per_step"] * 1e3:.0f}us x{t["calls_per_step"]:.0f}' for t in prof['top_kernels'][:4]), flush=True)
            save_json(a.out, res)
        # the products alone: gemv_rows against cuBLAS at each of the layer's shapes, T = 5
        if dev.type == 'cuda':
            L = m.layers[0]; at, f = L.attn, L.ffn
            x5 = torch.randn(5, kw['dim'], device=dev, dtype=torch.bfloat16); x5s = torch.randn(5, 2 * kw['ffn_dim'], device=dev, dtype=torch.bfloat16)
            for pname, ws, x, silu in [('qkv', [at.wq.weight, at.wk.weight, at.wv.weight], x5, False), ('wo', [at.wo.weight], x5, False),
                                       ('w13', [f.w1.weight, f.w3.weight], x5, False), ('w2', [f.w2.weight], x5s, True), ('head', [m.head.weight], x5, False)]:
                xin = x[:, :ws[0].shape[1]].contiguous()
                with torch.no_grad():
                    t_rows = graph_us(lambda: gemv_rows(x, ws, silu=silu))
                    t_lin = graph_us(lambda: [torch.nn.functional.linear(xin, w) for w in ws])
                r.setdefault('products_T5', {})[pname] = dict(gemv_rows_us=t_rows, cublas_us=t_lin)
                print(f'{name} T=5 {pname:5s} gemv_rows {t_rows:7.1f} us  cuBLAS {t_lin:7.1f} us', flush=True)
        save_json(a.out, res)
        del m, mf, cache
    if (a.mtp_round_gammas or a.draft_round_gammas) and dev.type == 'cuda': res['rounds'] = time_rounds(a, dev, res)
    save_json(a.out, res)
    print(f'wrote {a.out}')

def build(name, dev, a, **over):
    kw = dict(SHAPES[name], max_seq_len=1024, rope_interleaved=True, tie_embeddings=False, **over)
    if a.tiny: kw.update(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128)
    seed_everything(0)
    with torch.device(dev): m = Transformer(ModelConfig(**kw).validate())
    m = m.to(torch.bfloat16).eval(); m.init_freqs()
    return m

def gl(s): return [int(x) for x in s.split(',') if x]

def time_rounds(a, dev, res) -> dict:
    "Whole rounds (notebook 11's `_spec_round` / `_mtp_round`, compiled as the rounds run them) in a CUDA graph, and their draft steps alone."
    out = {}
    t, d = build('spec-target', dev, a, mtp_depth=1), build('spec-draft', dev, a)
    tf, df = (fold_norm_gains(copy.deepcopy(x)) for x in (t, d)) if a.fold_norms else (None, None)
    V, C, W = t.cfg.vocab_size, a.context, 1024
    cache, dcache = make_cache(t, 1, W, mtp=True), make_cache(d, 1, W, mtp=False)
    with torch.no_grad():
        ids = torch.randint(0, V, (1, C), device=dev)
        forward_step(t, ids, torch.arange(C, device=dev), cache); forward_step(d, ids, torch.arange(C, device=dev), dcache)
    seq = torch.randint(0, V, (1, W), device=dev); p = torch.full((1,), C, device=dev); p0 = p.clone()
    hidden = torch.randn(1, W, t.cfg.dim, device=dev, dtype=torch.bfloat16)
    # the steps alone: the MTP module over 2 positions, the draft over 2 tokens, module path against the verification's kernels
    h2, tok2, pos2 = hidden[:, C - 2:C], seq[:, C - 1:C + 1], torch.arange(C - 2, C, device=dev)
    steps = {'mtp 2 positions: mtp_step': (spec.mtp_step, (t, 0, h2, tok2, pos2, cache)),
             'mtp 2 positions: mtp_rows_step': (mtp_rows_step, (t, 0, h2, tok2, pos2, cache)),
             'draft 2 tokens: forward_step': (forward_step, (d, tok2, pos2 + 1, dcache)),
             'draft 2 tokens: verify_forward': (verify_forward, (d, tok2, pos2 + 1, dcache)),
             'draft 1 token: decode_forward': (decode_forward, (d, tok2[:, :1], pos2[:1] + 1, dcache))}
    rows_steps = [k for k in steps if 'rows_step' in k or 'verify_forward' in k]
    if a.few_rows: steps.update({k + ', gemv_few': steps[k] for k in rows_steps})
    if a.prologue_kernel: steps.update({k + ', prologue kernel': steps[k] for k in rows_steps})
    for k, (f, args) in steps.items():
        cf = torch.compile(f, dynamic=False)
        fn = switched(lambda: cf(*args), 'FEW_ROWS', a.few_rows if k.endswith('gemv_few') else 0)
        with torch.no_grad():
            try: us = graph_us(switched(fn, 'PROLOGUE_KERNEL', k.endswith('prologue kernel')))
            except Exception as e: out[k] = dict(error=short_error(e)); print(f'{k}: {out[k]["error"]}', flush=True); continue
        out[k] = dict(graph_us=us); print(f'{k:40s} compiled, graph {us:8.1f} us', flush=True); save_json(a.out, dict(res, rounds=out))
    # whole rounds: p reset before each (the round advances it); greedy, and sampled at each of --round-temperatures
    real_ok, real_mtp, real_few, real_pk, real_glu = spec.verify_ok, kernels.MTP_ROWS, kernels.FEW_ROWS, kernels.PROLOGUE_KERNEL, kernels.GLU_ROWS
    runs = ([(g, f'mtp round γ={g}: mtp_rows_step', dict(MTP_ROWS=True)) for g in gl(a.mtp_round_gammas)] +
            [(g, f'mtp round γ={g}: mtp_step', dict(MTP_ROWS=False)) for g in gl(a.mtp_round_gammas)] +
            [(g, f'draft round γ={g}: rows', {}) for g in gl(a.draft_round_gammas)] +
            [(g, f'draft round γ={g}: first draft step forward_step', dict(verify_ok=lambda m, x: m is t and real_ok(m, x)))
             for g in gl(a.draft_round_gammas)])
    base = list(runs)
    if a.few_rows:  # the same rounds with the products of up to FEW_ROWS rows in `gemv_few`
        runs += [(g, k + f', gemv_few <= {a.few_rows} rows', dict(pt, FEW_ROWS=a.few_rows)) for g, k, pt in base]
    if a.prologue_kernel:  # and with f(x) in `rows_prologue`
        runs += [(g, k + ', prologue kernel', dict(pt, PROLOGUE_KERNEL=True)) for g, k, pt in base]
    if a.fold_norms:  # and on the folded copies (the same weights with the gains in the products)
        runs += [(g, k + ', norms folded', dict(pt, FOLD=True)) for g, k, pt in base if 'first draft step' not in k]
    if a.glu_rows:  # and with silu(a) * b in the w1/w3 product, folded or not
        runs += [(g, k + ', glu rows', dict(pt, GLU_ROWS=True)) for g, k, pt in list(runs) if 'first draft step' not in k
                 and 'gemv_few' not in k and 'prologue kernel' not in k]
    temps = [float(x) for x in a.round_temperatures.split(',') if x]
    runs = [(g, k if T == 0 else f'{k}, temperature {T:g}', dict(pt, T=T)) for T in temps for g, k, pt in runs]
    for g, k, patch in runs:
        T, (mt, md) = patch.pop('T'), (tf, df) if patch.pop('FOLD', False) else (t, d)
        hist = torch.zeros(g + 1, dtype=torch.long, device=dev)
        for n, v in patch.items(): setattr(kernels if n in ('MTP_ROWS', 'FEW_ROWS', 'PROLOGUE_KERNEL', 'GLU_ROWS') else spec, n, v)
        torch._dynamo.reset()
        try:
            if k.startswith('mtp'):
                f = torch.compile(spec._mtp_round, fullgraph=True, dynamic=False)
                fn = lambda: (p.fill_(C), f(mt, seq, p, hidden, cache, hist, p0, g, T, None, None))
            else:
                f = torch.compile(spec._spec_round, fullgraph=True, dynamic=False)
                fn = lambda: (p.fill_(C), f(mt, md, seq, p, cache, dcache, hist, g, T, None, None))
            with torch.no_grad(): us = graph_us(fn); prof = profile_fn(fn, dev, steps=2, top=12)
            out[k] = dict(graph_us=us, profile=prof)
            print(f'{k:48s} graph {us:8.1f} us  kernels {prof["kernel_ms_per_step"] * 1e3:8.1f} us  '
                  + '  '.join(f'{x["name"][:32]} {x["ms_per_step"] * 1e3:.0f}us x{x["calls_per_step"]:.0f}' for x in prof['top_kernels'][:5]), flush=True)
        except Exception as e: out[k] = dict(error=short_error(e)); print(f'{k}: {out[k]["error"]}', flush=True)
        finally: spec.verify_ok, kernels.MTP_ROWS, kernels.FEW_ROWS, kernels.PROLOGUE_KERNEL, kernels.GLU_ROWS = real_ok, real_mtp, real_few, real_pk, real_glu
        save_json(a.out, dict(res, rounds=out))
    return out

if __name__ == '__main__': main()
