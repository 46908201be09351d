#!/usr/bin/env python3
"""The training loss's kernels alone, at the shapes of a `gpt2` and a `small` step (32,768 rows of 50,304 and 32,000
bf16 logits): inductor's compiled `F.cross_entropy` forward + backward, `cross_entropy_rows` forward + backward (two
Triton kernels), and `ce_grad_kernel` (the loss and the logits' gradient in one kernel, in place, one program per
row) for several warp counts. The logits'
traffic is printed beside each: 2 reads + 1 write for the first two, 1 read + 1 write (+ 1 read from L2 at best) for
the last. The products of the head are left out there (they are the same in every path); `--head` adds the whole
head, products included: `linear_cross_entropy` (bf16 products) against `linear_cross_entropy_fp8` (e4m3 states and
weight, e5m2 gradient), their parts timed apart, and the fp8 op's error against the bf16 one.

    python scripts/bench_ce.py --out bench/results/ce_h100.json
    python scripts/bench_ce.py --device cpu --tiny --out /tmp/ce_cpu.json   # the script's paths, under TRITON_INTERPRET=1
"""
import os, sys, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, time_fn, save_json, free
import torch
import torch.nn.functional as F
import metai.model.transformer as T


def head_rows(args, res, row, N:int, V:int, dev, g):
    "The whole head, bf16 against fp8 products, its parts, and the fp8 op's error against the bf16 one."
    D = 64 if args.tiny else args.dim
    h = torch.randn(N, D, device=dev, generator=g).to(torch.bfloat16)                # an RMSNorm's output: about unit scale
    w = (torch.randn(V, D, device=dev, generator=g) * 0.02).to(torch.bfloat16)       # init_std
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    f1 = 2 * N * D * V                                                               # one product's FLOPs
    row('head: linear_cross_entropy (bf16)', lambda: T.linear_cross_entropy(h, w, t), None, 3 * f1)
    row('head: linear_cross_entropy_fp8', lambda: T.linear_cross_entropy_fp8(h, w, t), None, 3 * f1)
    x = h @ w.T
    row('  bf16 h @ w.T', lambda: h @ w.T, None, f1)
    row('  bf16 x @ w', lambda: x @ w, None, f1)
    row('  bf16 x.T @ h', lambda: x.T @ h, None, f1)
    h8, h8t, sh = T.to_e4m3(h); w8, w8t, sw = T.to_e4m3(w)
    row('  fp8 scaled copies of h and w (both layouts)', lambda: (T.to_e4m3(h), T.to_e4m3(w)), None)
    wt, ht = w8t.T, h8t.T
    d8 = (x.float() / 32).to(torch.float8_e5m2); dt8 = d8.T.contiguous(); sg = torch.ones((), device=dev)
    mm = torch._scaled_mm
    row('  fp8 h8 @ w8.T', lambda: mm(h8, w8.T, scale_a=sh, scale_b=sw, out_dtype=torch.bfloat16), None, f1)
    row('  fp8 d8 @ w8', lambda: mm(d8, wt, scale_a=sg, scale_b=sw, out_dtype=torch.bfloat16), None, f1)
    row('  fp8 dt8 @ h8', lambda: mm(dt8, ht, scale_a=sg, scale_b=sh, out_dtype=torch.bfloat16), None, f1)
    loss, lse = torch.empty(N, device=dev), torch.empty(N, device=dev)
    gdt = torch.float32 if T.INTERPRET else torch.float8_e5m2
    d, dt = torch.empty(N, V, device=dev, dtype=gdt), torch.empty(V, N, device=dev, dtype=gdt)
    def kern():
        T.ce_fwd_kernel[(N,)](x, t, loss, lse, V, x.stride(0), BLOCK=256 if T.INTERPRET else T.CE_BLOCK, num_warps=T.CE_WARPS)
        T._tiled(T.ce_grad_fp8_kernel, N, V, x, t, lse, d, dt, N, V, T.FP8_GRAD_SCALE)
    row('  fp8 loss kernels (ce_fwd + ce_grad_fp8)', kern, 3)   # two reads of the bf16 logits, two 1-byte writes
    row('  ce_grad_fp8_kernel alone', lambda: T._tiled(T.ce_grad_fp8_kernel, N, V, x, t, lse, d, dt, N, V, T.FP8_GRAD_SCALE), 2)
    for k in ('ce_grad_fp8_kernel', 'fp8_cast_kernel'):   # the tiles triton.autotune kept at these shapes
        cache = getattr(getattr(T, k), 'cache', {})
        res.setdefault('tiles', {})[f'{k} V={V} D={D}'] = {str(key): str(cfg) for key, cfg in cache.items()}
    x = d = dt = d8 = dt8 = None; free(dev)
    l0, dh0, dw0 = T.linear_cross_entropy(h, w, t)
    l1, dh1, dw1 = T.linear_cross_entropy_fp8(h, w, t)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()
    err = dict(vocab=V, name='fp8 error vs bf16', loss=round(abs(l1.item() - l0.item()) / abs(l0.item()), 6),
               dh=round(rel(dh1, dh0), 5), dw=round(rel(dw1, dw0), 5))
    res['results'].append(err); print(f'V={V:6d} fp8 vs bf16 relative error: loss {err["loss"]:.2e}  dh {err["dh"]:.3e}  dw {err["dw"]:.3e}', flush=True)
    save_json(args.out, res); free(dev)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda')
    p.add_argument('--tiny', action='store_true', help='small shapes (a check of the script)')
    p.add_argument('--rows', type=int, default=32768)
    p.add_argument('--vocabs', default='50304,32000')
    p.add_argument('--warps', default='8,16', help='num_warps of ce_grad_kernel (CE_WARPS is the library default)')
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--head', action='store_true', help='also the whole head (products + loss) in bf16 and in fp8, at width --dim')
    p.add_argument('--dim', type=int, default=768, help='hidden width of the head rows')
    p.add_argument('--only-head', action='store_true', help='skip the loss-kernel rows')
    p.add_argument('--out', default='bench/results/ce_h100.json')
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    N = 64 if args.tiny else args.rows
    vocabs = [300] if args.tiny else [int(v) for v in args.vocabs.split(',')]
    res = dict(benchmark='ce', info=card_info(dev), rows=N, results=[])
    g = torch.Generator(device=dev).manual_seed(0)
    for V in vocabs:
        x = (torch.randn(N, V, device=dev, generator=g) * 3).to(torch.bfloat16)
        t = torch.randint(0, V, (N,), device=dev, generator=g)
        gb = N * V * 2 / 1e9  # one pass over the logits, GB
        def row(name, fn, passes, flops=None):
            r = time_fn(fn, dev, 3, args.iters)
            ms = r['median_ms']
            res['results'].append(dict(vocab=V, name=name, ms=round(ms, 3), logits_gb=round(gb, 3), passes=passes,
                                       tb_s=round(passes * gb / ms, 3) if passes else None,
                                       tflop_s=round(flops / ms / 1e9, 1) if flops else None))
            what = f'({passes} passes of {gb:.2f} GB: {passes * gb / ms:.2f} TB/s)' if passes else f'({flops / ms / 1e9:.0f} TFLOP/s)' if flops else ''
            print(f'V={V:6d} {name:44s} {ms:8.3f} ms  {what}', flush=True)
            save_json(args.out, res)
        if args.head: head_rows(args, res, row, N, V, dev, g)
        if args.only_head: continue
        xl = x.clone().requires_grad_()
        ind = torch.compile(lambda a, b: F.cross_entropy(a.float(), b))
        if not args.tiny: row('inductor F.cross_entropy fwd+bwd', lambda: torch.autograd.grad(ind(xl, t), xl), 3)
        def rows_fb():
            loss, lse = T.cross_entropy_rows(xl, t)
            return torch.autograd.grad(loss.sum(), xl)
        row('cross_entropy_rows fwd+bwd', rows_fb, 3)
        buf, loss = x.clone(), torch.empty(N, device=dev, dtype=torch.float32)
        for warps in [int(w) for w in args.warps.split(',')]:
            def k(): T.ce_grad_kernel[(N,)](buf, t, loss, V, buf.stride(0), BLOCK=256 if T.INTERPRET else T.CE_BLOCK, num_warps=warps)
            row(f'ce_grad_kernel, {warps} warps', k, 2)
        buf = xl = None; free(dev)
    save_json(args.out, res)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
