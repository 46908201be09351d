#!/usr/bin/env python3
"""The training loss's kernels alone, at the shapes of a `gpt2` and a `small` step (32,768 rows of 50,304 and 32,000
bf16 logits): inductor's compiled `F.cross_entropy` forward + backward, `cross_entropy_rows` forward + backward (two
Triton kernels), and `ce_grad_kernel` (the loss and the logits' gradient in one kernel, in place, one program per
row) for several warp counts. The logits'
traffic is printed beside each: 2 reads + 1 write for the first two, 1 read + 1 write (+ 1 read from L2 at best) for
the last. The products of the head are left out (they are the same in every path).

    python scripts/bench_ce.py --out bench/results/ce_h100.json
    python scripts/bench_ce.py --device cpu --tiny --out /tmp/ce_cpu.json   # the script's paths, under TRITON_INTERPRET=1
"""
import os, sys, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, time_fn, save_json, free
import torch
import torch.nn.functional as F
import metai.model.transformer as T


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda')
    p.add_argument('--tiny', action='store_true', help='small shapes (a check of the script)')
    p.add_argument('--rows', type=int, default=32768)
    p.add_argument('--vocabs', default='50304,32000')
    p.add_argument('--warps', default='8,16', help='num_warps of ce_grad_kernel (CE_WARPS is the library default)')
    p.add_argument('--iters', type=int, default=20)
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
        def row(name, fn, passes):
            r = time_fn(fn, dev, 3, args.iters)
            ms = r['median_ms']
            res['results'].append(dict(vocab=V, name=name, ms=round(ms, 3), logits_gb=round(gb, 3), passes=passes,
                                       tb_s=round(passes * gb / ms, 3)))
            print(f'V={V:6d} {name:40s} {ms:8.3f} ms  ({passes} passes of {gb:.2f} GB: {passes * gb / ms:.2f} TB/s)', flush=True)
            save_json(args.out, res)
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
