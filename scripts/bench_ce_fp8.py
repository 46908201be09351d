#!/usr/bin/env python3
"""Where the time of the fp8 gradient kernel goes (`ce_grad_fp8_kernel`, notebook 07), taken apart on the GPU.

At a `gpt2` step's shape (32,768 rows of 50,304 bf16 logits) the kernel takes about 3 ms on an H100 and on an H200
alike, so it is not bound by memory (the H200's is 1.4x faster). This script times the library kernel beside one
kernel with switches that leave out one part each: the transposed store, the row-major store, the masks, the
round-to-nearest-even conversion, the arithmetic (a plain copy into both fp8 layouts), and the transpose done on
fp32 values before the conversion; each over a few tile shapes. Last, a candidate: the library kernel with its
transposed copy moved as 32-bit words (four rows of a column packed in each) instead of bytes, checked equal to it. Read-only: nothing here is used by the library.

    python scripts/bench_ce_fp8.py --out bench/results/ce_fp8_parts_h100.json
"""
import os, sys, argparse
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, time_fn, save_json
import torch
import triton
import triton.language as tl
import metai.model.transformer as T


@triton.jit
def grad_parts(x_ptr, t_ptr, lse_ptr, d_ptr, dt_ptr, N, V, scale, BM: tl.constexpr, BN: tl.constexpr,
               STORE_D: tl.constexpr, STORE_DT: tl.constexpr, MASK: tl.constexpr, RTNE: tl.constexpr,
               MATH: tl.constexpr, TRANS_FP32: tl.constexpr, TRANS16: tl.constexpr = False):
    "`ce_grad_fp8_kernel` with switches (constexpr): which stores, masks or not, the rounding mode, the math or a copy."
    r0, c0 = tl.program_id(0) * BM, tl.program_id(1) * BN
    r, c = tl.arange(0, BM), tl.arange(0, BN)
    rows, cols = r0 + r, c0 + c
    m = (rows < N)[:, None] & (cols < V)[None, :]
    nv, vn = r0.to(tl.int64) * V + c0, c0.to(tl.int64) * N + r0
    if MASK: x = tl.load(x_ptr + nv + (r[:, None] * V + c[None, :]), mask=m, other=0.).to(tl.float32)
    else:    x = tl.load(x_ptr + nv + (r[:, None] * V + c[None, :])).to(tl.float32)
    if MATH:
        t = tl.load(t_ptr + rows, mask=rows < N, other=-100)
        lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.)
        g = tl.where(t == -100, 0., 1.)
        d = (tl.exp(x - lse[:, None]) * g[:, None] - tl.where(cols[None, :] == t[:, None], g[:, None], 0.)) * scale
    else: d = x
    if TRANS_FP32: dtr = tl.trans(d)
    if RTNE: d8 = d.to(d_ptr.dtype.element_ty, fp_downcast_rounding='rtne')
    else:    d8 = d.to(d_ptr.dtype.element_ty)
    if TRANS_FP32:
        if RTNE: dt8 = dtr.to(d_ptr.dtype.element_ty, fp_downcast_rounding='rtne')
        else:    dt8 = dtr.to(d_ptr.dtype.element_ty)
    elif TRANS16: dt8 = tl.trans(d8.to(tl.float16)).to(d_ptr.dtype.element_ty)   # e5m2 -> fp16 and back are exact
    else: dt8 = tl.trans(d8)
    if STORE_D:
        if MASK: tl.store(d_ptr + nv + (r[:, None] * V + c[None, :]), d8, mask=m)
        else:    tl.store(d_ptr + nv + (r[:, None] * V + c[None, :]), d8)
    if STORE_DT:
        if MASK: tl.store(dt_ptr + vn + (c[:, None] * N + r[None, :]), dt8, mask=tl.trans(m))
        else:    tl.store(dt_ptr + vn + (c[:, None] * N + r[None, :]), dt8)


@triton.jit
def grad_packed(x_ptr, t_ptr, lse_ptr, d_ptr, dt_ptr, N, V, scale, BM: tl.constexpr, BN: tl.constexpr):
    "The library kernel's arithmetic; the transposed copy moved as 32-bit words, 4 rows of a column packed in each (N % 4 == 0)."
    r0, c0 = tl.program_id(0) * BM, tl.program_id(1) * BN
    r, c = tl.arange(0, BM), tl.arange(0, BN)
    rows, cols = r0 + r, c0 + c
    rm, cm = rows < N, cols < V
    t = tl.load(t_ptr + rows, mask=rm, other=-100)
    lse2 = tl.load(lse_ptr + rows, mask=rm, other=0.) * 1.4426950408889634
    g = tl.where(t == -100, 0., scale)
    g = tl.where((t != -100) & ((t < 0) | (t >= V)), float('nan'), g)
    t = t.to(tl.int32)
    m = rm[:, None] & cm[None, :]
    nv = r0.to(tl.int64) * V + c0
    x = tl.load(x_ptr + nv + (r[:, None] * V + c[None, :]), mask=m, other=0.).to(tl.float32)
    p = tl.exp2(x * 1.4426950408889634 - lse2[:, None])
    d = (p * g[:, None] - tl.where(cols[None, :] == t[:, None], g[:, None], 0.)).to(d_ptr.dtype.element_ty, fp_downcast_rounding='rtne')
    tl.store(d_ptr + nv + (r[:, None] * V + c[None, :]), d, mask=m)
    b = tl.reshape(d.to(tl.uint8, bitcast=True).to(tl.uint32), (BM // 4, 4, BN))     # (BM/4, 4, BN)
    w = tl.sum(b << (tl.arange(0, 4) * 8).to(tl.uint32)[None, :, None], axis=1)      # (BM/4, BN): 4 rows in a word, little-endian
    q = tl.arange(0, BM // 4)
    dt32 = dt_ptr.to(tl.pointer_type(tl.uint32), bitcast=True)                        # (V, N/4) words
    tl.store(dt32 + c0.to(tl.int64) * (N // 4) + r0 // 4 + (c[:, None] * (N // 4) + q[None, :]), tl.trans(w),
             mask=cm[:, None] & ((r0 // 4 + q) < N // 4)[None, :])


VARIANTS = {  # name: switches
    # 'all': the library kernel's work with its former arithmetic (a 64-bit compare, exp, the scale applied last)
    'all': dict(STORE_D=True, STORE_DT=True, MASK=True, RTNE=True, MATH=True, TRANS_FP32=False),
    'no masks': dict(STORE_D=True, STORE_DT=True, MASK=False, RTNE=True, MATH=True, TRANS_FP32=False),
    'default rounding': dict(STORE_D=True, STORE_DT=True, MASK=True, RTNE=False, MATH=True, TRANS_FP32=False),
    'transpose before the cast': dict(STORE_D=True, STORE_DT=True, MASK=True, RTNE=True, MATH=True, TRANS_FP32=True),
    'transpose as fp16': dict(STORE_D=True, STORE_DT=True, MASK=True, RTNE=True, MATH=True, TRANS_FP32=False, TRANS16=True),
    'row-major store only': dict(STORE_D=True, STORE_DT=False, MASK=True, RTNE=True, MATH=True, TRANS_FP32=False),
    'transposed store only': dict(STORE_D=False, STORE_DT=True, MASK=True, RTNE=True, MATH=True, TRANS_FP32=False),
    'copy, both layouts': dict(STORE_D=True, STORE_DT=True, MASK=True, RTNE=True, MATH=False, TRANS_FP32=False),
    'copy, row-major only': dict(STORE_D=True, STORE_DT=False, MASK=True, RTNE=True, MATH=False, TRANS_FP32=False),
}
TILES = [(128, 64, 4), (64, 128, 4), (128, 128, 8), (64, 64, 4), (256, 64, 8), (128, 64, 8)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--rows', type=int, default=32768)
    p.add_argument('--vocab', type=int, default=50304)
    p.add_argument('--iters', type=int, default=20)
    p.add_argument('--out', default='bench/results/ce_fp8_parts_h100.json')
    p.add_argument('--device', default='cuda', help="'cpu' runs a check of the script under TRITON_INTERPRET=1 (small sizes)")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == 'cpu': args.rows, args.vocab, args.iters = 256, 640, 2
    N, V = args.rows, args.vocab
    g = torch.Generator(device=dev).manual_seed(0)
    x = (torch.randn(N, V, device=dev, generator=g) * 3).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device=dev, generator=g)
    lse = torch.logsumexp(x.float(), -1)
    d, dt = torch.empty(N, V, device=dev, dtype=torch.float8_e5m2), torch.empty(V, N, device=dev, dtype=torch.float8_e5m2)
    gb = N * V * 2 / 1e9
    res = dict(benchmark='ce_fp8_parts', info=card_info(dev), rows=N, vocab=V, logits_gb=round(gb, 3), results=[])
    def row(name, fn, bytes_gb, **kw):
        ms = time_fn(fn, dev, 3, args.iters)['median_ms']
        res['results'].append(dict(name=name, ms=round(ms, 3), tb_s=round(bytes_gb / ms, 3), **kw))
        print(f'{name:60s} {ms:7.3f} ms  {bytes_gb / ms:5.2f} TB/s', flush=True)
        save_json(args.out, res)
    row('library ce_grad_fp8_kernel (autotuned)', lambda: T._tiled(T.ce_grad_fp8_kernel, N, V, x, t, lse, d, dt, N, V, T.FP8_GRAD_SCALE), 2 * gb)
    ref_d = d.float().clone()
    for name, sw in VARIANTS.items():
        traffic = gb * (1 + 0.5 * sw['STORE_D'] + 0.5 * sw['STORE_DT'])   # bf16 read, 1-byte writes
        for bm, bn, w in TILES:
            grid = (triton.cdiv(N, bm), triton.cdiv(V, bn))
            fn = lambda: grad_parts[grid](x, t, lse, d, dt, N, V, T.FP8_GRAD_SCALE, BM=bm, BN=bn, num_warps=w, **sw)
            try: row(f'{name} [{bm}x{bn}, {w} warps]', fn, traffic, variant=name, tile=[bm, bn, w])
            except Exception as e: res['results'].append(dict(name=f'{name} [{bm}x{bn}]', error=str(e)[:200]))
            if name == 'all' and (bm, bn, w) == TILES[0]:   # the former arithmetic against the library's: same roundings?
                res['all_equal_fraction'] = (d.float() == ref_d).float().mean().item()
    d.zero_(); dt.zero_()
    T._tiled(T.ce_grad_fp8_kernel, N, V, x, t, lse, d, dt, N, V, T.FP8_GRAD_SCALE); lib_d, lib_dt = d.float().clone(), dt.float().clone()
    for bm, bn, w in TILES:   # the packed transpose: 32-bit words through shared memory instead of bytes
        grid = (triton.cdiv(N, bm), triton.cdiv(V, bn))
        fn = lambda: grad_packed[grid](x, t, lse, d, dt, N, V, T.FP8_GRAD_SCALE, BM=bm, BN=bn, num_warps=w)
        try: row(f'packed transpose [{bm}x{bn}, {w} warps]', fn, 2 * gb, variant='packed transpose', tile=[bm, bn, w])
        except Exception as e: res['results'].append(dict(name=f'packed transpose [{bm}x{bn}]', error=str(e)[:200]))
    res['packed_equals_library'] = bool(torch.equal(d.float(), lib_d) and torch.equal(dt.float(), lib_dt))
    save_json(args.out, res)
    print('packed transpose == library:', res['packed_equals_library'])
    print('entries equal to the library kernel\'s:', res.get('all_equal_fraction'), f'\nwrote {args.out}')


if __name__ == '__main__':
    main()
