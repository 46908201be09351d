#!/usr/bin/env python3
"""Which `gemv` tile is best for each product of the 1B decode step, inside the real chain?

The autotuner times each kernel alone, where tiles differ by little. This script times the 16-layer stack of a 1B
Llama step's products (q/k/v with the norm, the output projection with the residual, w1/w3 with the norm, the
down-projection with SwiGLU), distinct weights per layer, as one CUDA graph with PDL on (where the card has it), as decoding runs it. For each
product in turn it swaps in every tile of notebook 09b's list (the others as `gemv` picks them) and times the stack.
Writes the stack time per (product, tile), `gemv`'s own choice, and the stack with the best tile for every product.
With `--int4` the same for `gemv_int4` (group size 64) over its own tile list.

    python scripts/bench_gemv_tiles.py --out bench/results/gemv_tiles_h200.json
    python scripts/bench_gemv_tiles.py --int4 --out bench/results/gemv_int4_tiles_h200.json
"""
import argparse
from bench_common import card_info, save_json, graph_us as _graph_us
import torch, triton
from metai.infer.kernels import gemv, gemv_kernel, gemv_int4, gemv_int4_kernel, _TILES, _TILES_INT4, _LONG_TILE, _pdl
from metai.infer.quant import quantize_int4, pack_int4

D, F, L = 2048, 8192, 16  # the 1B shape of bench_decode.py
SHAPES = [('qkv', D, (2048, 512, 512), 'norm'), ('wo', D, (2048,), 'res'), ('w13', D, (F, F), 'norm'), ('w2', F, (2048,), 'silu')]

def graph_us(fn) -> float: return _graph_us(fn, iters=15, warmup=2)  # the whole stack per call

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--int4', action='store_true', help='sweep gemv_int4 (group size 64) instead of the bf16 gemv')
    a = ap.parse_args()
    G = 64
    torch.manual_seed(0)
    bf = dict(device='cuda', dtype=torch.bfloat16)
    layers = [[[torch.randn(n, k, **bf) / k ** .5 for n in ns] for _, k, ns, _ in SHAPES] for _ in range(L)]
    if a.int4:  # each weight as (codes (N, K/2) uint8, scales, zeros), notebook 12's layout
        layers = [[[(pack_int4(q), s_, z) for q, s_, z in (quantize_int4(w, G) for w in ws)] for ws in layer] for layer in layers]
    g, res = torch.ones(D, **bf), torch.randn(D, **bf)
    xin = {'norm': torch.randn(D, **bf), 'res': torch.randn(D, **bf), 'silu': torch.randn(2 * F, **bf)}
    outs = [torch.empty(sum(ns), **bf) for _, _, ns, _ in SHAPES]
    pdl = _pdl(g)  # as gemv launches: PDL on Hopper and later

    def launch(i, ws, tile):  # tile None: as `gemv` / `gemv_int4` launch it
        name, k, ns, kind = SHAPES[i]
        kw = dict(norm=g) if kind == 'norm' else dict(residual=res) if kind == 'res' else dict(silu=True)
        if tile is None: return gemv_int4(xin[kind], *map(list, zip(*ws)), G, **kw) if a.int4 else gemv(xin[kind], ws, **kw)
        Ns = list(ns) + [0, 0]; N = sum(ns); y = outs[i]
        if a.int4:
            q, sc, z = [list(t) + [t[0]] * (3 - len(ws)) for t in zip(*ws)]
            wargs, kern, extra = (*[t.view(torch.int32) for t in q], *sc, *z), gemv_int4_kernel, dict(G=G)
        else: wargs, kern, extra = ws + [ws[0]] * (3 - len(ws)), gemv_kernel, {}
        args = (xin[kind], g, res if kind == 'res' else y, y, *wargs, Ns[0], Ns[1], N, k, 1e-6)
        bn, bk, w, st = tile
        kern[(triton.cdiv(N, bn),)](*args, **extra, NORM=kind == 'norm', SILU=kind == 'silu', RES=kind == 'res', PDL=pdl,
                                     BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=st, launch_pdl=pdl)

    def stack(tiles):
        for ws in layers:
            for i in range(4): launch(i, ws[i], tiles[i])

    nbytes = sum(sum(n * k for n in ns) for _, k, ns, _ in SHAPES) * L * (2 if not a.int4 else 0.5 + 4 / G)  # int4: codes + bf16 scale and zero
    info = card_info(torch.device('cuda'))
    r = dict(card=f"{info.get('card')} (torch {info.get('torch')}, triton {info.get('triton')}), {str(info.get('date', ''))[:10]}", info=info,
             what=f"16-layer stack of 1B decode products{' in int4 (G = 64)' if a.int4 else ''}, one CUDA graph, PDL {'on' if pdl else 'off'}",
             stack_bytes=nbytes, tiles=_TILES_INT4 if a.int4 else _TILES, long_tile=None if a.int4 else _LONG_TILE, sweep={})
    r['gemv_us'] = graph_us(lambda: stack([None] * 4))
    print(f'{"gemv_int4" if a.int4 else "gemv"} as shipped: {r["gemv_us"]:.1f} us, {nbytes / r["gemv_us"] / 1e6:.2f} TB/s', flush=True)
    best = []
    for i, (name, k, ns, kind) in enumerate(SHAPES):
        rows = []
        for t in (_TILES_INT4 if a.int4 else _TILES):
            if ns[0] % t[0] or (ns + (0, 0))[1] % t[0]: continue
            tiles = [None] * 4; tiles[i] = t
            rows.append((graph_us(lambda: stack(tiles)), t))
        rows.sort(); r['sweep'][name] = rows; best.append(rows[0][1])
        print(name, ', '.join(f'{t}: {us:.0f} us' for us, t in rows), flush=True)
        save_json(a.out, r)
    r['best'] = best; r['best_us'] = graph_us(lambda: stack(best))
    print(f'best tile for each product {best}: {r["best_us"]:.1f} us, {nbytes / r["best_us"] / 1e6:.2f} TB/s', flush=True)
    save_json(a.out, r)

if __name__ == '__main__':
    main()
