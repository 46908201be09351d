"""Batch-1 matrix-vector products on one GPU: metai's Triton `gemv` / `gemv_int4` (notebook 09b) against cuBLAS
(`F.linear`) and PyTorch's int4 kernel (`_weight_int4pack_mm`) at the shapes of the 125M and 1B Llama decode
benchmarks, each shape alone and the whole layer stack (plus the head) as one pass, timed as CUDA graphs of many
calls (no launch gaps between them but the GPU's own), reported as weight bytes streamed per second.

    python scripts/bench_gemv.py --out bench/results/gemv_h200.json
"""
import argparse, sys
from bench_common import ROOT, card_info, save_json, sync
import torch
import torch.nn.functional as F
from metai.infer.kernels import gemv, gemv_int4
from metai.infer.quant import quantize_int4, pack_int4, _inner_k_tiles

SHAPES = {  # name -> (K, [N_i], prologue): the products of one layer of each model, as the fused decode step runs them
    '1b': dict(dim=2048, layers=16, vocab=128256, prods=[(2048, (2048, 512, 512), 'norm'), (2048, (2048,), 'res'),
                                                           (2048, (8192, 8192), 'norm'), (8192, (2048,), 'silu')]),
    '125m': dict(dim=768, layers=12, vocab=32000, prods=[(768, (768, 768, 768), 'norm'), (768, (768,), 'res'),
                                                        (768, (2048, 2048), 'norm'), (2048, (768,), 'silu')]),
}

def graph_time(fn, reps:int=20, iters:int=5) -> float:
    "Seconds per call of `fn`: `reps` calls captured in one CUDA graph, the median of `iters` replays."
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3 / reps)
    return sorted(ts)[len(ts) // 2]

def prods_for(K, Ns, kind, dev):
    "Callables for one product: cuBLAS (unfused, as separate layers), Triton bf16, Triton int4, PyTorch int4."
    bf = dict(device=dev, dtype=torch.bfloat16)
    ws = [torch.randn(n, K, **bf) / K ** 0.5 for n in Ns]
    x = torch.randn(2 * K if kind == 'silu' else K, **bf)
    xk = x[:K].contiguous().view(1, K)
    a = dict(norm=torch.ones(K, **bf)) if kind == 'norm' else dict(residual=torch.randn(sum(Ns), **bf)) if kind == 'res' else {}
    q, s, z = zip(*[quantize_int4(w, 64) for w in ws])
    qp = [pack_int4(t) for t in q]
    packed = [torch.ops.aten._convert_weight_to_int4pack(t.contiguous(), _inner_k_tiles(K)) for t in qp]
    sz = [torch.stack([si, zi], -1).transpose(0, 1).contiguous() for si, zi in zip(s, z)]
    return dict(
        cublas=lambda: [F.linear(xk, w) for w in ws],
        triton=lambda: gemv(x, ws, silu=kind == 'silu', **a),
        triton_int4=lambda: gemv_int4(x, qp, list(s), list(z), 64, silu=kind == 'silu', **a),
        torch_int4=lambda: [torch.ops.aten._weight_int4pack_mm(xk, p, 64, t) for p, t in zip(packed, sz)],
    ), sum(w.numel() for w in ws) * 2, sum(t.numel() + si.numel() * 4 for t, si in zip(qp, s))

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--models', default='125m,1b')
    a = ap.parse_args()
    dev = torch.device('cuda')
    res = dict(card=card_info(dev), shapes={}, stacks={})
    for name in a.models.split(','):
        spec = SHAPES[name]
        stack = {}
        for K, Ns, kind in spec['prods'] + [(spec['dim'], (spec['vocab'],), 'norm')]:
            fns, b16, b4 = prods_for(K, Ns, kind, dev)
            row = dict(K=K, N=list(Ns), prologue=kind, bf16_bytes=b16, int4_bytes=b4)
            for k, fn in fns.items():
                try: t = graph_time(fn)
                except Exception as e: row[k] = dict(error=f'{type(e).__name__}: {e}'[:200]); continue
                nb = b4 if 'int4' in k else b16
                row[k] = dict(us=t * 1e6, gb_per_s=nb / t / 1e9)
                n = 1 if K == spec['dim'] and Ns == (spec['vocab'],) else spec['layers']
                stack[k] = stack.get(k, 0.0) + n * t
            res['shapes'][f'{name} K={K} N={"+".join(map(str, Ns))} {kind}'] = row
            print(f'{name:5s} K={K:5d} N={"+".join(map(str, Ns)):17s} {kind:4s} ' + '  '.join(
                f'{k} {row[k]["us"]:7.1f} us {row[k]["gb_per_s"]:6.0f} GB/s' if 'us' in row[k] else f'{k} error' for k in fns), flush=True)
            del fns; torch.cuda.empty_cache()
        res['stacks'][name] = {k: dict(ms=v * 1e3) for k, v in stack.items()}
        print(f'{name}: a decode step\'s products (layers + head): ' + ', '.join(f'{k} {v * 1e3:.3f} ms' for k, v in stack.items()), flush=True)
        save_json(a.out, res)
    print(f'wrote {a.out}')

if __name__ == '__main__': main()
