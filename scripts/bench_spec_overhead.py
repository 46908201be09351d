#!/usr/bin/env python3
"""What a whole speculative `generate` costs beyond its rounds: random bf16 weights of `bench_verify.py`'s spec-target
(one MTP module) and spec-draft, 64-token prompt, greedy, compiled, rounds in CUDA graphs; wall time and rounds at 256
and 32 new tokens, for the models built in memory and for the same weights saved and loaded back through
`load_model_dir` (the path `bench_speculative.py` and the CLI take) and through the previous loader (an fp32 model
filled, then cast); then one call under the profiler. `--temperatures 0,0.8` adds sampled calls, `--replays-in-flight 1,2`
measures each call with each setting, and `--profile-each` puts every call of the first `--new-tokens` under the
profiler (its kernels and their busy time against the wall time). Every call also records, without the profiler, the
host's time inside each CUDA graph launch (`CUDAGraph.replay`) and inside each wait for a replay's results (the
rounds' event), so a call's wall time splits into launching, waiting and the host's own work. Compare
`ms_per_round` with `bench_verify.py --draft-round-gammas 4 --mtp-round-gammas 1` (one round in a CUDA graph).

    python scripts/bench_spec_overhead.py --out bench/results/spec_overhead_h200.json
    python scripts/bench_spec_overhead.py --order direct --temperatures 0,0.8 --replays-in-flight 1,2 --new-tokens 256 --profile-each --out /tmp/so.json
    python scripts/bench_spec_overhead.py --device cpu --tiny --out /tmp/spec_overhead.json   # a quick check of the script
"""
import os, re, sys, time, json, argparse, tempfile
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import card_info, save_json, profile_fn, graph_shape
from bench_verify import build
import torch
from safetensors.torch import save_model, load_model
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.core import get_device
from metai.infer.speculative import speculative_generate, mtp_speculative_generate
from metai.infer.generate import load_model_dir, prefill, fast_prefill
from metai.infer.speculative import forward_hidden, mtp_step, mtp_prompt_phase
import metai.infer.speculative as spec
from metai.infer.cache import make_cache

def load_cast(path, dev, dtype):
    "The same folder loaded the way `load_model_dir` did before `load_transformer`: an fp32 model filled, then cast."
    cfg = ModelConfig.from_json(os.path.join(path, 'config.json'))
    with torch.device('meta'): m = Transformer(cfg)
    m = m.to_empty(device=dev)
    if cfg.tie_embeddings: m.head.weight = m.embed.weight
    load_model(m, os.path.join(path, 'model.safetensors'), strict=True, device=str(dev))
    m = m.to(dtype); m.init_freqs()
    return m.eval()

HOST = dict(launch=[], wait=[])  # host seconds inside each graph launch and each wait for a replay's copy, this call

def time_host_calls():
    "Wrap `CUDAGraph.replay` and `Event.synchronize` so that each call's host time is appended to HOST (no sync added)."
    def wrap(cls, name, key):
        f = getattr(cls, name)
        def timed_call(self, *args, **kw):
            t0 = time.perf_counter(); r = f(self, *args, **kw); HOST[key].append(time.perf_counter() - t0); return r
        setattr(cls, name, timed_call)
    wrap(torch.cuda.CUDAGraph, 'replay', 'launch'); wrap(torch.cuda.Event, 'synchronize', 'wait')

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--out', required=True)
    ap.add_argument('--device', default=None)
    ap.add_argument('--order', default='loaded,cast,direct', help='the models in the order measured: loaded back through '
                    '`load_model_dir` (loaded), loaded as an fp32 model then cast (cast, the previous loader), built in memory (direct)')
    ap.add_argument('--temperatures', default='0', help='sampling temperatures of the calls (0: greedy)')
    ap.add_argument('--new-tokens', default='256,32')
    ap.add_argument('--profile-each', action='store_true', help='each call of the first --new-tokens also under the profiler')
    ap.add_argument('--replays-in-flight', default='', help='batch-1 rounds: replays launched before the host reads the oldest '
                    "(REPLAYS_IN_FLIGHT; a comma list: each is measured; default: the library's setting)")
    ap.add_argument('--cases', default='draft,mtp', help='draft-model calls, MTP calls, or both')
    ap.add_argument('--trace', default=None, help='with --profile-each: also write each timeline as a Chrome trace in this folder')
    ap.add_argument('--graph-dump', default=None, help='keep every CUDA graph captured and write each as a DOT file in this folder at '
                    'the end (cudaGraphDebugDotPrint), with its nodes counted by type')
    ap.add_argument('--tiny', action='store_true')
    a = ap.parse_args()
    dev = get_device(a.device); cuda = dev.type == 'cuda'
    if cuda: time_host_calls()
    graphs, now = [], ['setup']  # with --graph-dump: (case being measured, graph) for every capture
    if cuda and a.graph_dump:
        class KeptGraph(torch.cuda.CUDAGraph):  # every graph the library captures keeps its cudaGraph_t: the DOT dump needs it
            def __new__(cls, keep_graph=True): return super().__new__(cls, True)
            def capture_begin(self, *args, **kw): self.enable_debug_mode(); graphs.append((now[0], self)); return super().capture_begin(*args, **kw)
        torch.cuda.CUDAGraph = KeptGraph
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    res = dict(card=card_info(dev), settings=vars(a), cases={})
    t, d = build('spec-target', dev, a, mtp_depth=1), build('spec-draft', dev, a)
    tmp = tempfile.mkdtemp()
    for m, sub in ((t, 'target'), (d, 'draft')):
        os.makedirs(f'{tmp}/{sub}'); m.cfg.to_json(f'{tmp}/{sub}/config.json'); save_model(m, f'{tmp}/{sub}/model.safetensors')
    dt = t.embed.weight.dtype
    models = dict(direct=(t, d), loaded=tuple(load_model_dir(f'{tmp}/{s}', device=dev, dtype=dt)[0] for s in ('target', 'draft')),
                  cast=tuple(load_cast(f'{tmp}/{s}', dev, dt) for s in ('target', 'draft')))
    prompt = torch.randint(0, t.cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(0)).tolist()

    def timed(fn, runs=3):
        for _ in range(2): fn()
        ts, host = [], []
        for _ in range(runs):
            for v in HOST.values(): v.clear()
            sync(); t0 = time.perf_counter(); r = fn(); sync(); ts.append(time.perf_counter() - t0)
            host.append({k: list(v) for k, v in HOST.items()})
        i = sorted(range(runs), key=lambda i: ts[i])[runs // 2]  # the median call, with its host times
        return ts[i], r, host[i]

    def case(name, tg, dr, g, n, T=0.0):
        S = -(-(64 + n + g) // 8) * 8
        now[0] = name
        c = make_cache(tg, 1, S, mtp=dr is None)
        if dr is None:
            h = torch.zeros(1, S, tg.cfg.dim, device=dev, dtype=dt)
            fn = lambda: mtp_speculative_generate(tg, prompt, n, gamma=g, temperature=T, seed=0, cache=c, hidden=h, compile=cuda)
        else:
            dc = make_cache(dr, 1, S, mtp=False)
            fn = lambda: speculative_generate(tg, dr, prompt, n, gamma=g, temperature=T, seed=0, cache=c, draft_cache=dc, compile=cuda)
        s, (out, st), host = timed(fn)
        r = res['cases'][name] = dict(ms=s * 1e3, rounds=st['target_forwards'], ms_per_round=s * 1e3 / st['target_forwards'], new=len(out))
        L, Wt = sorted(host['launch']), host['wait']
        if L:  # each launch's host time: the GPU cannot start a replay before its launch returns
            r['host'] = dict(launches=len(L), launch_ms=sum(L) * 1e3, launch_median_ms=L[len(L) // 2] * 1e3, launch_max_ms=L[-1] * 1e3,
                             waits=len(Wt), wait_ms=sum(Wt) * 1e3, other_ms=(s - sum(L) - sum(Wt)) * 1e3)
        print(f'{name:28s} {r["ms"]:8.1f} ms  {r["rounds"]:4d} rounds  {r["ms_per_round"]:.3f} ms per round'
              + (f'  host: {len(L)} launches {r["host"]["launch_ms"]:.1f} ms (median {r["host"]["launch_median_ms"]:.3f}), '
                 f'waiting {r["host"]["wait_ms"]:.1f} ms, other {r["host"]["other_ms"]:.1f} ms' if L else ''), flush=True)
        if a.profile_each and n == ns[0]:
            tr = None if a.trace is None else os.path.join(a.trace, re.sub(r'[^A-Za-z0-9.]+', '_', name) + '.json')
            if tr: os.makedirs(a.trace, exist_ok=True)
            prof = r['profile'] = profile_fn(fn, dev, steps=2, top=12, trace=tr)
            print(f'  profiled: wall {prof["wall_ms_per_step"]:.1f} ms, kernels {prof["kernel_ms_per_step"]:.1f} ms  '
                  + '  '.join(f'{x["name"][:32]} {x["ms_per_step"]:.2f}ms x{x["calls_per_step"]:.0f}' for x in prof['top_kernels'][:6]), flush=True)
        save_json(a.out, res)
        return fn

    def prompt_phase(name, tg, dr):  # what a call does before its rounds: both caches filled, or h^0 and the MTP slots;
        ids = torch.tensor([prompt[:-1]], device=dev); pos = torch.arange(len(prompt) - 1, device=dev)  # eagerly (the calls
        c, dc = make_cache(tg, 1, 128, mtp=True), make_cache(dr, 1, 128, mtp=False)                  # before run 6), then
        seq = torch.tensor([prompt + [0] * 80], device=dev)                                           # as the calls run it
        h = torch.zeros(1, 128, tg.cfg.dim, device=dev, dtype=dt)
        def draft_fill(): prefill(tg, ids, c); prefill(dr, ids, dc)
        def mtp_fill(): h = forward_hidden(tg, ids, pos, c)[1]; mtp_step(tg, 0, h[:, :-1], ids[:, 1:], pos[:-1], c)
        def draft_fill_compiled(): fast_prefill(tg, ids, c, 0, cuda); fast_prefill(dr, ids, dc, 0, cuda)
        def mtp_fill_compiled(): mtp_prompt_phase(tg, seq, h, c, 0, 0, len(prompt), 128, cuda)
        for k, f in ((f'{name}: draft prompt phase, eager', draft_fill), (f'{name}: MTP prompt phase, eager', mtp_fill),
                     (f'{name}: draft prompt phase', draft_fill_compiled), (f'{name}: MTP prompt phase', mtp_fill_compiled)):
            with torch.no_grad(): s_, _, _ = timed(f)
            res['cases'][k] = dict(ms=s_ * 1e3)
            print(f'{k:28s} {s_ * 1e3:8.1f} ms', flush=True)

    first, ns, rif_default = None, [int(x) for x in a.new_tokens.split(',')], spec.REPLAYS_IN_FLIGHT
    for which in a.order.split(','):
        tg, dr = models[which]
        prompt_phase(which, tg, dr)
        for T, rif in [(float(x), r) for x in a.temperatures.split(',') for r in [int(r) for r in a.replays_in_flight.split(',') if r] or [None]]:
            tn = ('' if T == 0 else f', temperature {T:g}') + ('' if rif is None else f', in flight {rif}')
            spec.REPLAYS_IN_FLIGHT = rif_default if rif is None else rif
            for n in ns:
                if 'draft' in a.cases: f = case(f'{which}: draft γ=4, {n} new{tn}', tg, dr, 4, n, T); first = first or f
                if 'mtp' in a.cases: case(f'{which}: MTP γ=1, {n} new{tn}', tg, None, 1, n, T)
    spec.REPLAYS_IN_FLIGHT = rif_default
    if cuda and first is not None:  # one call under the profiler: the GPU's busy time against the wall time
        from torch.profiler import profile, ProfilerActivity
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            sync(); t0 = time.perf_counter(); first(); sync(); wall = time.perf_counter() - t0
        ka = prof.key_averages()
        res['profile'] = dict(case=a.order.split(',')[0] + ': draft γ=4, 256 new', wall_ms=wall * 1e3,
                              gpu_kernel_ms=sum(e.self_device_time_total for e in ka) / 1e3,
                              top_cpu=[dict(name=e.key, self_cpu_ms=e.self_cpu_time_total / 1e3, calls=e.count)
                                       for e in sorted(ka, key=lambda e: -e.self_cpu_time_total)[:12]])
        print(f'profile: wall {wall * 1e3:.1f} ms, GPU kernels {res["profile"]["gpu_kernel_ms"]:.1f} ms', flush=True)
    if graphs:  # what each captured graph holds: a launch's host time may depend on its node types, not only their number
        os.makedirs(a.graph_dump, exist_ok=True)
        res['graphs'] = []
        for i, (name, g) in enumerate(graphs):
            path = os.path.join(a.graph_dump, f'graph_{i}.dot')
            try: shape = graph_shape(g, path)
            except Exception as e: res['graphs'].append(dict(case=name, error=str(e)[:200])); continue
            res['graphs'].append(dict(case=name, file=os.path.basename(path), **shape))
            print(f'graph {i} ({name}): {shape}', flush=True)
    save_json(a.out, res)
    print(f'wrote {a.out}')

if __name__ == '__main__': main()
