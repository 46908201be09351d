#!/usr/bin/env python3
"""Would FP8 matrix products make metai's `gpt2` training step faster? A measurement before any model code.

For every linear layer shape of the `gpt2` preset at 32×1024 tokens (the fused q/k/v, the attention output, the fused
SwiGLU gate/up, the down projection, the output head), time one training use of the layer: forward `y = x Wᵀ`, and
backward `dx = dy W`, `dW = dyᵀ x`. Two versions, each compiled with `torch.compile`:

* bf16: `F.linear` on bf16 operands, as under autocast;
* fp8: per-tensor scaled float8 (e4m3 for x and W, e5m2 for dy) through `torch._scaled_mm`, the casts included: the
  amax of each operand, its scale, the cast, and the transposed copies `_scaled_mm`'s layout rules need (its first
  operand row-major, its second column-major), which is what an FP8 training linear (torchao's, DeepSeek-V3's) pays.

Each time is the median of CUDA-event-timed calls on fresh random inputs; the per-step sum multiplies each shape by
its count in the model (12 layers, one head) and is compared with the step's measured matmul time. The output also
records the relative error of fp8 against an fp32 product. On the CPU (`--tiny`) it only checks the arithmetic.

    python scripts/bench_fp8.py --out bench/results/fp8_h200.json
    python scripts/bench_fp8.py --device cpu --tiny --out /tmp/fp8.json
"""
import os, sys, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, set_matmul_precision, time_fn, save_json, short_error
import torch
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def to_fp8(t, dtype):
    "Per-tensor scaling: `t / s` fits the format's range; returns (fp8 tensor, fp32 scale s)."
    s = (t.abs().amax().float() / torch.finfo(dtype).max).clamp(min=1e-12)
    return (t.float() / s).to(dtype), s


def mm8(a, sa, b, sb):
    "`a @ b` with `a` row-major (M, K) and `b` column-major (K, N), both fp8 with their scales; bf16 out."
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)


def fp8_train_use(x, w, dy):
    "Forward and both backward products of a linear layer in fp8: y (M, N), dx (M, K), dW (N, K)."
    x8, sx = to_fp8(x, E4M3); w8, sw = to_fp8(w, E4M3); dy8, sdy = to_fp8(dy, E5M2)
    y = mm8(x8, sx, w8.t(), sw)                                # (M, K) @ (K, N): W (N, K) row-major is (K, N) column-major
    wt8, swt = to_fp8(w.t().contiguous(), E4M3)                # (K, N) row-major, so its .t() is (N, K) column-major
    dx = mm8(dy8, sdy, wt8.t(), swt)                           # (M, N) @ (N, K)
    dyt8, sdyt = to_fp8(dy.t().contiguous(), E5M2)             # (N, M) row-major
    xt8, sxt = to_fp8(x.t().contiguous(), E4M3)                # (K, M) row-major, so .t() is (M, K) column-major
    dw = mm8(dyt8, sdyt, xt8.t(), sxt)                         # (N, M) @ (M, K)
    return y, dx, dw


def bf16_train_use(x, w, dy):
    return F.linear(x, w), dy @ w, dy.t() @ x


def shapes(tiny:bool):
    "(name, M, K, N, count per step) of the gpt2 preset's linear layers at 32×1024 tokens (fused projections)."
    if tiny: return [('qkv', 64, 32, 96, 2), ('head', 64, 32, 160, 1)]
    M, d = 32 * 1024, 768
    return [('qkv', M, d, 3 * d, 12), ('wo', M, d, d, 12), ('w13', M, d, 2 * 2048, 12), ('w2', M, 2048, d, 12),
            ('head', M, d, 50304, 1)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda')
    p.add_argument('--out', default='bench/results/fp8_h200.json')
    p.add_argument('--tiny', action='store_true', help='toy shapes, eager, to check the arithmetic on a CPU')
    p.add_argument('--iters', type=int, default=20)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    set_matmul_precision()
    res = dict(benchmark='fp8', what='one training use of a linear layer (y, dx, dW): bf16 vs per-tensor fp8 with its casts',
               info=card_info(device), settings=vars(args), shapes=[], errors=[])
    comp = (lambda f: f) if args.tiny or device.type != 'cuda' else (lambda f: torch.compile(f))
    fns = {'bf16': comp(bf16_train_use), 'fp8': comp(fp8_train_use)}
    tot = {'bf16': 0.0, 'fp8': 0.0}
    for name, M, K, N, count in shapes(args.tiny):
        g = torch.Generator(device='cpu').manual_seed(0)
        mk = lambda *s: (torch.randn(*s, generator=g) * 0.5).to(device, torch.bfloat16)
        sets = [(mk(M, K), mk(N, K) * 0.05, mk(M, N) * 1e-3) for _ in range(2 if args.tiny else 3)]  # rotate: no cached inputs
        row = dict(name=name, M=M, K=K, N=N, count=count)
        x, w, dy = (t.float() for t in sets[0])
        ref = (x @ w.t(), dy @ w, dy.t() @ x)
        for kind, f in fns.items():
            try:
                out = f(*sets[0])
                row[f'{kind}_rel_err'] = [round(((o.float() - r).norm() / r.norm()).item(), 5) for o, r in zip(out, ref)]
                it = iter(range(10**9))
                t = time_fn(lambda: f(*sets[next(it) % len(sets)]), device, warmup=3, iters=args.iters)
                row[f'{kind}_ms'] = round(t['median_ms'], 4); tot[kind] += count * t['median_ms']
            except Exception as e: res['errors'].append(f'{name} {kind}: {short_error(e)}')
        if 'bf16_ms' in row and 'fp8_ms' in row: row['speedup'] = round(row['bf16_ms'] / row['fp8_ms'], 3)
        res['shapes'].append(row); save_json(args.out, res)
        print(f"{name:5s} M={M} K={K} N={N} x{count}: bf16 {row.get('bf16_ms')} ms, fp8 {row.get('fp8_ms')} ms "
              f"({row.get('speedup')}x), fp8 rel. err {row.get('fp8_rel_err')}", flush=True)
    res['per_step_ms'] = {k: round(v, 3) for k, v in tot.items()}
    save_json(args.out, res)
    print(f"per step (sum over the model's linears): bf16 {tot['bf16']:.2f} ms, fp8 {tot['fp8']:.2f} ms; wrote {args.out}")
    for e in res['errors']: print('!', e)


if __name__ == '__main__':
    main()
