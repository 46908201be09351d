#!/usr/bin/env python3
"""What a CUDA graph's launch costs the host, by what the graph holds. A speculative call's four-round graphs took
0.03 ms (greedy draft rounds) to 0.69 ms (sampled rounds, MTP rounds) of host time per `CUDAGraph.replay` with about
the same kernel count (`bench_spec_overhead.py`, run 5), and the GPU cannot start a replay before its launch returns.
This script captures graphs of `--nodes` short kernels each: a Triton kernel alone (with and without programmatic
dependent launch), an aten pointwise op, an inductor-compiled one (with a random draw every `--every`), and the Triton chain with a cuBLAS product, a random draw or a device copy
every `--every` kernels; then times each graph's `replay()` on the host, with the GPU idle (after a sync) and with the
previous replay still running, and the replay's GPU time. Two more kinds test the shape of the graph rather than
its kernels: `zero` (`Tensor.zero_`, which may be captured as a memset node) and `fork` (a kernel on a side stream,
forked from and joined to the chain: the graph is no longer a straight line; the driver launches straight-line graphs
of kernel nodes in constant time since CUDA 12.6, other graphs in time that grows with their nodes).

    python scripts/bench_graph_launch.py --out bench/results/graph_launch_h200.json
"""
import os, sys, time, json, argparse, statistics, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, save_json, graph_shape
import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait, gdc_launch_dependents

@triton.jit
def bump_kernel(x_ptr, N: tl.constexpr, PDL: tl.constexpr):
    "x += 1 over N elements: a kernel of a few microseconds, as most of a decode step's are."
    if PDL: gdc_launch_dependents()
    if PDL: gdc_wait()
    i = tl.arange(0, N)
    tl.store(x_ptr + i, tl.load(x_ptr + i) + 1.0)

@torch.compile(fullgraph=True)
def bump_compiled(x): x.add_(1.0)                                   # one inductor kernel

@torch.compile(fullgraph=True)
def bump_compiled_rand(x): x.add_(torch.rand_like(x))              # inductor's RNG: a seeds kernel, then the fused draw

def chain(kind:str, n:int, every:int, bufs:dict):
    "The work to capture: n launches, Triton `bump_kernel` (or aten `add_`, or inductor) with one other operation every `every`."
    x, a, b, c, r, src, dst, y, side = (bufs[k] for k in ('x', 'a', 'b', 'c', 'r', 'src', 'dst', 'y', 'side'))
    pdl = kind.endswith('pdl')
    for i in range(n):
        if kind == 'aten': x.add_(1.0); continue
        if kind == 'inductor': bump_compiled(x); continue
        if kind == 'inductor-rand': (bump_compiled_rand if i % every == every - 1 else bump_compiled)(x); continue
        if i % every == every - 1:
            if kind.startswith('cublas'): torch.mm(a, b, out=c); continue
            if kind.startswith('rand'): r.uniform_(); continue
            if kind.startswith('copy'): dst.copy_(src); continue
            if kind.startswith('zero'): dst.zero_(); continue
            if kind.startswith('fork'):                          # a branch: one kernel beside the chain, then joined
                main = torch.cuda.current_stream(); side.wait_stream(main)
                with torch.cuda.stream(side): bump_kernel[(1,)](y, N=y.numel(), PDL=False)
                main.wait_stream(side); continue
        bump_kernel[(1,)](x, N=x.numel(), PDL=pdl, launch_pdl=pdl)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--nodes', type=int, default=1000, help='operations per graph (a four-round sampled draft graph: 1,012 kernels)')
    ap.add_argument('--every', type=int, default=50, help='one cuBLAS product / random draw / copy every this many operations')
    ap.add_argument('--kinds', default='triton,triton-pdl,aten,inductor,inductor-rand,cublas,cublas-pdl,rand,rand-pdl,copy,copy-pdl,'
                    'zero,zero-pdl,fork,fork-pdl')
    ap.add_argument('--reps', type=int, default=50)
    a = ap.parse_args()
    dev = torch.device('cuda')
    res = dict(card=card_info(dev), settings=vars(a), graphs={})
    bufs = dict(x=torch.zeros(256, device=dev), a=torch.randn(64, 64, device=dev, dtype=torch.bfloat16),
                b=torch.randn(64, 64, device=dev, dtype=torch.bfloat16), c=torch.empty(64, 64, device=dev, dtype=torch.bfloat16),
                r=torch.empty(8192, device=dev), src=torch.randn(4096, device=dev), dst=torch.empty(4096, device=dev),
                y=torch.zeros(256, device=dev), side=torch.cuda.Stream(dev))
    for kind in a.kinds.split(','):
        s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s): chain(kind, a.every * 2, a.every, bufs)  # compile and warm every operation first
        torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph(keep_graph=True); g.enable_debug_mode()  # kept: the DOT dump needs the cudaGraph_t
        with torch.cuda.graph(g): chain(kind, a.nodes, a.every, bufs)
        g.instantiate()
        shape = graph_shape(g, os.path.join(tempfile.mkdtemp(), f'{kind}.dot'))  # what the capture made of it
        for _ in range(3): g.replay()
        torch.cuda.synchronize()
        idle, busy, gpu = [], [], []
        for _ in range(a.reps):  # the GPU idle: the host's time inside replay(), then the replay's GPU time
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record(); t0 = time.perf_counter(); g.replay(); idle.append(time.perf_counter() - t0); e1.record()
            e1.synchronize(); gpu.append(e0.elapsed_time(e1))
        for _ in range(a.reps):  # the previous replay still running (two in flight, as the speculative rounds launch)
            g.replay(); t0 = time.perf_counter(); g.replay(); busy.append(time.perf_counter() - t0)
            torch.cuda.synchronize()
        r = res['graphs'][kind] = dict(launch_idle_ms=statistics.median(idle) * 1e3, launch_busy_ms=statistics.median(busy) * 1e3,
                                       gpu_ms=statistics.median(gpu), launch_idle_max_ms=max(idle) * 1e3, **shape)
        print(f'{kind:12s} launch, GPU idle {r["launch_idle_ms"]:.3f} ms (max {r["launch_idle_max_ms"]:.3f}), '
              f'previous replay running {r["launch_busy_ms"]:.3f} ms; replay on the GPU {r["gpu_ms"]:.3f} ms; '
              f'nodes {shape["node_types"]}, joins {shape["joins"]}, forks {shape["forks"]}', flush=True)
        save_json(a.out, res)
        del g
    print(f'wrote {a.out}')

if __name__ == '__main__': main()
