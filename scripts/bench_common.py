"""Shared pieces of metai's GPU benchmarks (`bench_model.py`, `bench_train.py`): the card's description, CUDA-event
timing after warm-up, a profile of kernel time by category, a wall-clock budget, and atomic JSON output."""
import os, re, sys, json, time, math, platform, datetime, statistics, subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path: sys.path.insert(0, ROOT)  # run from a checkout without installing metai

import numpy as np
import torch
from metai.core import atomic_write_text
from metai.data.datasets import read_meta

PEAK_BF16 = 989e12  # dense bf16 datasheet peak of an H100 SXM (an H200 has the same); MFU is quoted against it


def card_info(device:torch.device) -> dict:
    "Name of the card and versions of the software that ran the benchmark."
    d = dict(device=device.type, torch=torch.__version__, python=platform.python_version(),
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
    for mod in ('transformers', 'triton'):
        try: d[mod] = __import__(mod).__version__
        except Exception: pass
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        d.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda, sm_count=p.multi_processor_count,
                 mem_gib=round(p.total_memory / 2**30, 1))
        try:
            q = 'name,driver_version,memory.total,clocks.max.sm,power.limit'
            d['nvidia_smi'] = subprocess.run(['nvidia-smi', f'--query-gpu={q}', '--format=csv,noheader'],
                                             capture_output=True, text=True, timeout=30).stdout.strip()
        except Exception as e: d['nvidia_smi'] = f'unavailable ({type(e).__name__})'
    else: d['card'] = f'CPU ({platform.machine()}, {os.cpu_count()} cores)'
    return d


def set_matmul_precision():
    "TF32 for the few fp32 matmuls (the routers), as nanoGPT's train.py does; bf16 autocast covers the rest."
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize(device)


def time_fn(fn, device:torch.device, warmup:int=3, iters:int=10) -> dict:
    "Call `fn` `warmup` times (compilation happens in the first), then time `iters` calls; the median is the figure."
    t0 = time.perf_counter(); fn(); sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1): fn()
    sync(device)
    t0 = time.perf_counter()
    if device.type == 'cuda':  # events recorded back to back: launch gaps count, as they do in training
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in evs: s.record(); fn(); e.record()
        torch.cuda.synchronize(device)
        ms = [s.elapsed_time(e) for s, e in evs]
    else:
        ms = []
        for _ in range(iters):
            t = time.perf_counter(); fn(); ms.append((time.perf_counter() - t) * 1e3)
    wall = time.perf_counter() - t0
    return dict(first_call_s=round(first, 2), median_ms=statistics.median(ms), min_ms=min(ms), max_ms=max(ms),
                ms=[round(m, 3) for m in ms], wall_ms_per_iter=wall * 1e3 / iters)


# Kernel names -> what they do. First match wins, so the specific patterns come first.
CATEGORIES = [
    ('attention', r'flash|fmha|attention|sdpa|_attn|mha_|cudnn'),
    ('grouped matmul (MoE experts)', r'group'),
    ('matmul', r'gemm|nvjet|xmma|cutlass|cublas|wgmma|matmul|_mm_|triton_tem|splitk|sm90_|aten::(mm|addmm|bmm)\b'),
    ('optimizer', r'adam|multi_tensor|foreach'),
    ('sort / gather / scatter (routing)', r'sort|radix|scatter|gather|index|cumsum|topk|histc|bincount|nonzero'),
    ('loss', r'nll|log_softmax|cross_entropy'),
    ('fused pointwise / reduction (triton)', r'triton'),
    ('copy / fill / other elementwise', r'copy|memcpy|memset|fill|elementwise|vectorized|reduce'),
]


ANNOTATION = re.compile(r'^(Optimizer\.|## |ProfilerStep|autograd::)')


def categorize(name:str) -> str:
    for cat, pat in CATEGORIES:
        if re.search(pat, name, re.I): return cat
    return 'other'


def profile_fn(fn, device:torch.device, steps:int=2, top:int=15, trace:str|None=None) -> dict:
    """Run `fn` `steps` times under torch.profiler; device time per step by kernel category, and the top kernels.
    `trace`: also write the timeline there as a Chrome trace (open it in Perfetto)."""
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps): fn()
        sync(device)
        wall = (time.perf_counter() - t0) * 1e3 / steps
    if trace: prof.export_chrome_trace(trace)
    kernels = {}
    for e in prof.key_averages():
        if ANNOTATION.match(e.key): continue  # ranges drawn on the GPU timeline around kernels already counted
        if device.type == 'cuda':
            if 'CUDA' not in str(getattr(e, 'device_type', '')): continue  # kernels only: CPU ops would count them twice
            t = getattr(e, 'self_device_time_total', None)
            if t is None: t = getattr(e, 'self_cuda_time_total', 0)
        else: t = e.self_cpu_time_total
        if t > 0:
            k = kernels.setdefault(e.key, [0.0, 0]); k[0] += t / 1e3 / steps; k[1] += e.count / steps
    cats = {}
    for name, (ms, _) in kernels.items(): cats[categorize(name)] = cats.get(categorize(name), 0.0) + ms
    busy = sum(ms for ms, _ in kernels.values())
    tops = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(wall_ms_per_step=round(wall, 3), kernel_ms_per_step=round(busy, 3),
                busy_fraction=round(busy / wall, 3) if wall else None,
                categories={k: round(v, 3) for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                top_kernels=[dict(name=n[:160], ms_per_step=round(ms, 3), calls_per_step=round(c, 1), category=categorize(n))
                             for n, (ms, c) in tops])



def graph_us(fn, iters:int=7, warmup:int=3) -> float:
    "Microseconds per call of `fn`, captured once in a CUDA graph (after `warmup` calls on a side stream), the median of `iters` replays."
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g): fn()
    g.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b) * 1e3)
    return sorted(ts)[len(ts) // 2]

class Budget:
    "A wall-clock budget: items that would not fit are skipped (and recorded as skipped) rather than cut off."
    def __init__(self, seconds:float): self.t0, self.seconds = time.perf_counter(), seconds
    def left(self) -> float: return self.seconds - (time.perf_counter() - self.t0)
    def allows(self, need:float) -> bool: return self.left() >= need


_NODE_KINDS = r'\b(KERNEL|MEMCPY|MEMSET|HOST|EVENT_RECORD|WAIT_EVENT|EMPTY|MEM_ALLOC|MEM_FREE|CONDITIONAL|CHILD_GRAPH|BATCH_MEM_OP)\b'

def graph_shape(g:torch.cuda.CUDAGraph, path:str) -> dict:
    """Write a captured graph (captured after `g.enable_debug_mode()`) as DOT (cudaGraphDebugDotPrint) to `path` and
    count its nodes by type and its shape: a straight line has no node with two inputs (joins) or two outputs (forks)."""
    g.debug_dump(path)
    if not os.path.exists(path): return dict(error='no DOT file written (capture with CUDAGraph(keep_graph=True) and enable_debug_mode())')
    text = open(path).read()
    types, ins, outs = {}, {}, {}
    for k in re.findall(_NODE_KINDS, text): types[k] = types.get(k, 0) + 1
    edges = re.findall(r'"(\w+)"\s*->\s*"(\w+)"', text)
    for a, b in edges: outs[a] = outs.get(a, 0) + 1; ins[b] = ins.get(b, 0) + 1
    return dict(node_types=types, edges=len(edges), joins=sum(v > 1 for v in ins.values()),
                forks=sum(v > 1 for v in outs.values()), bytes=len(text))


def save_json(path:str, obj:dict):
    "Write `obj` as JSON atomically (a killed run leaves the last complete file)."
    atomic_write_text(path, json.dumps(obj, indent=1, default=_jsonable) + '\n')


def _jsonable(o):
    if isinstance(o, (torch.device, torch.dtype)): return str(o)
    if isinstance(o, float) and not math.isfinite(o): return None
    raise TypeError(f'not JSON serialisable: {type(o).__name__}')


def free(device:torch.device):
    "Drop compiled graphs and cached blocks between models, so each model's peak memory is its own."
    import gc
    from metai.infer.generate import clear_graphs
    clear_graphs()  # captured decode graphs point at compiled kernels and constants that the reset frees
    torch._dynamo.reset(); gc.collect()
    if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)


def peak_mem_gb(device:torch.device):
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == 'cuda' else None


def short_error(e:BaseException) -> str:
    return f'{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ""}'


def compile_mode(mode:str):
    "`torch.compile`'s mode argument for a mode name ('default' is None)."
    return None if mode in ('', 'default', None) else mode


def held_out_prompt(data_dir:str, n:int, vocab_size:int) -> list:
    """The first `n` tokens of the validation split of a `metai prepare-data` folder: from the first document's bos on
    (a first document shorter than `n` tokens runs on into the next one, eos and bos between)."""
    meta = read_meta(data_dir)
    path = os.path.join(data_dir, 'val.bin')
    if not meta or not os.path.isfile(path): raise SystemExit(f'--prompt-data: {data_dir} is not a prepared data folder (no meta.json or val.bin)')
    if os.path.getsize(path) == 0: raise SystemExit(f'{path}: empty (no validation tokens)')
    toks = np.memmap(path, dtype=meta.get('dtype', 'uint16'), mode='r')[:n].tolist()
    if len(toks) < n: raise SystemExit(f'{path}: {len(toks)} tokens, fewer than --prompt-len {n}')
    if max(toks) >= vocab_size: raise SystemExit(f'{path}: token ids up to {max(toks)}, the model has {vocab_size} (another tokenizer?)')
    return toks
