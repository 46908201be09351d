"""The batch-1 decode kernels of notebook 09b on one GPU, each against what it replaces, cold (every weight and cache
read once per pass, as in a real decode step) and timed as CUDA graphs:

- the products of a whole decode step (every layer's q/k/v, wo, w1/w3, w2, then the head, distinct weights per layer)
  with `gemv`, with and without programmatic dependent launch, against cuBLAS (`F.linear`, unfused);
- `decode_attention` over every layer's cache at two positions, for nine (positions per block, programs) settings,
  against its PyTorch reference (RoPE, index writes, SDPA over the whole cache);
- a top-k = 200 draw from one row of logits: `sample` (the race over `torch.topk`'s k values) against a softmax and
  race over the whole vocabulary (`logits_to_probs`), both compiled.

    python scripts/bench_kernels.py --out bench/results/kernels_h200.json
"""
import argparse, time, traceback
from bench_common import card_info, save_json, graph_us
import torch
import torch.nn.functional as F
import metai.infer.kernels as K
from metai.infer.kernels import gemv, decode_attention, decode_attention_ref
from metai.infer.generate import multinomial_no_sync, logits_to_probs, sample

MODELS = {'1b': dict(dim=2048, layers=16, vocab=128256, ffn=8192, kv_dim=512, heads=32, kv_heads=8, head_dim=64),
          '125m': dict(dim=768, layers=12, vocab=32000, ffn=2048, kv_dim=768, heads=12, kv_heads=12, head_dim=64)}

def products(m:dict, bf:dict) -> dict:
    "One decode step's products: Triton `gemv` (PDL off, on) and cuBLAS, microseconds and weight bytes per second."
    D, L, V, FF, KVD = m['dim'], m['layers'], m['vocab'], m['ffn'], m['kv_dim']
    layers = [dict(q=[torch.randn(n, D, **bf) / D ** .5 for n in (D, KVD, KVD)], o=torch.randn(D, D, **bf) / D ** .5,
                   w13=[torch.randn(FF, D, **bf) / D ** .5 for _ in range(2)], w2=torch.randn(D, FF, **bf) / FF ** .5) for _ in range(L)]
    head, g, x0 = torch.randn(V, D, **bf) / D ** .5, torch.ones(D, **bf), torch.randn(D, **bf)
    nbytes = 2 * (sum(w.numel() for l in layers for w in l['q'] + l['w13'] + [l['o'], l['w2']]) + head.numel())
    def ours():
        x = x0
        for l in layers:
            qkv = gemv(x, l['q'], g, 1e-5)
            x = gemv(qkv[:D], [l['o']], residual=x)
            x = gemv(gemv(x, l['w13'], g, 1e-5), [l['w2']], residual=x, silu=True)
        return gemv(x, [head], g, 1e-5)
    def cublas():
        x = x0.view(1, D)
        for l in layers:
            qkv = [F.linear(x, w) for w in l['q']]
            x = x + F.linear(qkv[0], l['o'])
            x = x + F.linear(F.silu(F.linear(x, l['w13'][0])) * F.linear(x, l['w13'][1]), l['w2'])
        return F.linear(x, head)
    r = dict(cublas=graph_us(cublas))
    for pdl in (False, True):
        K.PDL = pdl
        r[f'gemv_pdl_{"on" if pdl else "off"}'] = graph_us(ours)
    K.PDL = True
    return dict(weight_bytes=nbytes, **{k: dict(us=v, tb_per_s=nbytes / v / 1e6) for k, v in r.items()})

def attention(m:dict, bf:dict, S:int=2048) -> dict:
    "Microseconds per layer of `decode_attention` (nine settings) and its reference, at positions 320 and 2000."
    H, KV, D, L = m['heads'], m['kv_heads'], m['head_dim'], m['layers']
    caches = [[torch.randn(1, S, KV, D, **bf) for _ in range(2)] for _ in range(L)]
    cos, sin = torch.randn(S, D // 2, device='cuda'), torch.randn(S, D // 2, device='cuda')
    qkv = torch.randn((H + 2 * KV) * D, **bf)
    out, keep = {}, (K.ATTN_BLOCK_S, K.ATTN_PROGRAMS)
    for pos in (320, 2000):
        p, r = torch.tensor([pos], device='cuda'), {}
        r['reference'] = graph_us(lambda: [decode_attention_ref(qkv, a, b, p, cos, sin, H, KV, True, D ** -.5) for a, b in caches]) / L
        for bs in (16, 32, 64):
            for progs in (64, 128, 256):
                K.ATTN_BLOCK_S, K.ATTN_PROGRAMS = bs, progs
                r[f'block{bs}_programs{progs}'] = graph_us(lambda: [decode_attention(qkv, a, b, p, cos, sin, H, KV, True, D ** -.5) for a, b in caches]) / L
        K.ATTN_BLOCK_S, K.ATTN_PROGRAMS = keep
        out[f'pos{pos}'] = r
    return out

def sampling(V:int, k:int=200) -> dict:
    "Microseconds per top-k draw from one row of V bf16 logits (temperature 0.8), compiled: over the whole vocabulary, or `sample`'s k."
    lg = torch.randn(1, V, device='cuda', dtype=torch.bfloat16) * 3
    paths = dict(full_vocab=lambda l: multinomial_no_sync(logits_to_probs(l, 0.8, k, None)),
                 torch_topk=lambda l: sample(l, 0.8, k, None))
    return {name: graph_us(lambda f=torch.compile(fn, fullgraph=True): f(lg)) for name, fn in paths.items()}

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--models', default='1b,125m')
    a = ap.parse_args()
    bf = dict(device='cuda', dtype=torch.bfloat16)
    res = dict(card=card_info(torch.device('cuda')), settings=dict(attention_cache=2048, sampling='top-k 200, temperature 0.8'))
    for name in a.models.split(','):
        m = MODELS[name]
        for part, fn in (('products', lambda: products(m, bf)), ('attention', lambda: attention(m, bf)),
                         ('sampling', lambda: sampling(m['vocab']))):
            t = time.time()
            torch.manual_seed(0)
            try: res.setdefault(name, {})[part] = r = fn()
            except Exception as e:
                traceback.print_exc(); res.setdefault(name, {})[part] = dict(error=f'{type(e).__name__}: {e}'[:300]); continue
            torch.cuda.empty_cache()
            print(f'{name} {part} ({time.time() - t:.0f} s): {r}', flush=True)
            save_json(a.out, res)
    print(f'wrote {a.out}')

if __name__ == '__main__': main()
