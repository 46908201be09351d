#!/usr/bin/env python3
"""Training-step throughput of metai `gpt2` (dense) and `small` (MoE) against nanoGPT's GPT-2 124M in the same run, and
a quality check at equal tokens (metai `gpt2` vs nanoGPT on the same tokenized data, schedule and token budget).

A training step is what `metai.train.loop` does each step: bf16 autocast forward with the loss through
`torch.compile(model)`, backward (with gradient accumulation when asked), global gradient-norm clipping at 1.0 and
a fused AdamW step from `metai.train.loop.configure_optimizer`, taken by the loop's `clip_step` (the clipping inside
the fused update, skipped on a non-finite loss or norm); nanoGPT's step is its train.py's (compiled model,
its own `configure_optimizers`, fused AdamW, the same clipping). Inputs are random tokens already on the GPU, so
data loading is left out of both. MFU = `cfg.flops_per_token(T, training=True)` * tokens/s / 989 TFLOP/s; for
nanoGPT its own `estimate_mfu` formula (6N + 12*L*H*Q*T), which counts the same FLOPs within 0.1%.

nanoGPT is public code (github.com/karpathy/nanoGPT, MIT) run beside metai only for this measurement: it is not part
of metai and not in this repository. Pass the folder holding its `model.py` with `--nanogpt-dir`.

    python scripts/bench_train.py --device cuda --nanogpt-dir PATH --data-dir DIR --out bench/results/train_h100.json
    python scripts/bench_train.py --device cpu --tiny --nanogpt-dir PATH --data-dir DIR --out /tmp/train_cpu.json
"""
import os, sys, math, time, argparse, itertools, contextlib, importlib.util
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import (PEAK_BF16, compile_mode, card_info, set_matmul_precision, time_fn, profile_fn, Budget, save_json, free,
                          peak_mem_gb, short_error, sync)
import numpy as np
import torch
from metai.core import get_device, autocast, seed_everything
from metai.config import ModelConfig
from metai.model.transformer import Transformer
import metai.model.transformer as metai_transformer
import metai.model.moe as metai_moe
import metai.model.attention as metai_attention
from metai.train.loop import configure_optimizer, clip_step, CUDA_GRAPH_MODES
from metai.data.datasets import LazyTextDataset, read_meta

TINY = dict(dim=64, n_layers=2, ffn_dim=128, max_seq_len=64)


def load_nanogpt(folder:str):
    "Import nanoGPT's model.py from `folder` (under its own module name, so nothing else called `model` is shadowed)."
    path = os.path.join(folder, 'model.py')
    if not os.path.isfile(path): raise FileNotFoundError(f'{path}: no such file (pass --nanogpt-dir, the folder of nanoGPT\'s model.py)')
    spec = importlib.util.spec_from_file_location('nanogpt_model', path)
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod


def nanogpt_source(folder:str) -> dict:
    "Where the baseline came from: the sha256 of its model.py, and the commit when a COMMIT file beside it says so."
    import hashlib
    d = dict(model_py_sha256=hashlib.sha256(open(os.path.join(folder, 'model.py'), 'rb').read()).hexdigest())
    c = os.path.join(folder, 'COMMIT')
    if os.path.isfile(c): d['commit'] = open(c).read().strip()
    return d


def nanogpt_config(ng, vocab_size:int=50304, tiny:bool=False, block_size:int=1024):
    "GPT-2 124M as nanoGPT's train.py builds it: 12 layers, 12 heads, 768 wide, no biases, no dropout."
    if tiny: return ng.GPTConfig(block_size=64, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=False)
    return ng.GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=12, n_head=12, n_embd=768, dropout=0.0, bias=False)


def metai_config(name:str, tiny:bool=False, **over) -> ModelConfig:
    if not tiny: return ModelConfig.preset(name, **over)
    extra = dict(n_heads=4, n_kv_heads=2, moe_ffn_dim=32) if name == 'small' else dict(n_heads=2)
    return ModelConfig.preset(name, **{**TINY, **extra, **over})


def nanogpt_flops_per_token(model, T:int) -> int:
    "nanoGPT's estimate_mfu numerator per token: 6N + 12*L*H*Q*T (N without position embeddings)."
    c = model.config
    return 6 * model.get_num_params() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T


def random_batches(vocab:int, B:int, T:int, device, n:int=4, seed:int=0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, vocab, (B, T + 1), generator=g)
        out.append((t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)))
    return out


def make_train_step(loss_fn, model, opt, batches:list, accum:int, device, clip:float=1.0, loop_step:bool=False):
    "One optimizer step over `accum` micro-batches; `loop_step`: clip and step with metai.train.loop's `clip_step` (else clip_grad_norm_, step)."
    it = itertools.cycle(batches)
    params = list(model.parameters())
    def step():
        loss_sum = 0.0
        for _ in range(accum):
            x, y = next(it)
            with autocast(device): loss = loss_fn(x, y)
            (loss / accum).backward()
            loss_sum = loss_sum + loss.detach() / accum
        if loop_step: clip_step(opt, params, clip, loss_sum)  # clipping inside the fused AdamW, the finite test on the device
        else: torch.nn.utils.clip_grad_norm_(params, clip); opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def throughput(name:str, build, device, args, flops_fn, extra:dict, profile:bool) -> dict:
    "Build (model, loss_fn, opt), compile, time training steps; retry at half the micro-batch with 2x accumulation on OOM."
    B, accum = args.batch, args.grad_accum
    while True:
        model = opt = None
        if accum > 1 and extra.get('compile_mode') in CUDA_GRAPH_MODES:  # CUDA graphs corrupt accumulated grads
            raise RuntimeError(f"{extra['compile_mode']} needs grad_accum=1 (pytorch/pytorch#169545); batch {B} x {accum} would not fit otherwise")
        try:
            if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
            model, loss_fn, opt = build()
            batches = random_batches(args.vocab_of(model), B, args.T, device)
            step = make_train_step(loss_fn, model, opt, batches, accum, device,
                                   loop_step=extra.get('impl') == 'metai' and not extra.get('separate_clip'))
            t = time_fn(step, device, args.warmup, args.iters)
            break
        except torch.OutOfMemoryError:
            if B == 1: raise
            model = opt = None; free(device); B, accum = B // 2, accum * 2
            print(f'  {name}: out of memory, retrying with batch {B} x {accum} accumulation', flush=True)
    tokens = B * accum * args.T
    tps = tokens / (t['median_ms'] / 1e3)
    fpt = flops_fn(model)
    r = dict(name=name, micro_batch=B, grad_accum=accum, seq_len=args.T, tokens_per_step=tokens, tokens_per_s=round(tps),
             flops_per_token=fpt, mfu=round(fpt * tps / PEAK_BF16, 4) if device.type == 'cuda' else None,
             peak_mem_gb=peak_mem_gb(device), compile_and_first_step_s=t['first_call_s'], median_ms=round(t['median_ms'], 3),
             min_ms=round(t['min_ms'], 3), max_ms=round(t['max_ms'], 3), step_ms=t['ms'],
             params=sum(p.numel() for p in model.parameters()), **extra)
    if profile:
        try: r['profile'] = profile_fn(step, device, steps=2, top=40)
        except Exception as e: r['profile_error'] = short_error(e)
    print(f"{name:28s} {r['tokens_per_s']:>11,} tok/s  {r['median_ms']:8.2f} ms/step  "
          f"MFU {r['mfu'] if r['mfu'] is not None else float('nan'):.3f}  peak {r['peak_mem_gb']} GB  batch {B}x{accum}  "
          f"(compile + first step {r['compile_and_first_step_s']} s)", flush=True)
    return r


def lr_at(it:int, warmup:int, steps:int, lr:float, min_lr:float) -> float:
    "nanoGPT's train.py schedule: linear warmup, cosine decay to min_lr."
    if it < warmup: return lr * (it + 1) / (warmup + 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / max(1, steps - warmup)))) * (lr - min_lr)


@torch.no_grad()
def val_loss(model, loss_fn, val_x, val_y, device, chunk:int=8) -> float:
    "Mean next-token loss over every validation window (the model in eval mode)."
    model.eval(); tot, n = 0.0, 0
    for i in range(0, len(val_x), chunk):
        x, y = val_x[i:i + chunk].to(device), val_y[i:i + chunk].to(device)
        with autocast(device): tot += loss_fn(x, y).float().item() * len(x)
        n += len(x)
    model.train()
    return tot / n


@contextlib.contextmanager
def library_flags(extra:dict):
    "Set notebook 05's, 06's and 07's switches for one row (`fused_swiglu`, `fused_ce`, ... in `extra`; the library's defaults otherwise) and `cdt`, then restore them."
    saved = {(m, n): getattr(m, n) for m, n in SWITCHES}   # read when a step is traced: a change recompiles it
    for (m, n), v in saved.items(): setattr(m, n, extra.get(n.lower(), v))
    tune = torch._inductor.config.patch(coordinate_descent_tuning=True) if extra.get('cdt') else contextlib.nullcontext()
    try:
        with tune: yield   # cdt: inductor tunes each of its kernels' tiles at compile time
    finally:
        for (m, n), v in saved.items(): setattr(m, n, v)


SWITCHES = [(metai_attention, 'FUSED_QKV_ROPE'), (metai_moe, 'FUSED_SWIGLU')] + [(metai_transformer, n) for n in ('FUSED_CE', 'FUSED_HEAD_CE', 'FP8_HEAD', 'BF16_RESIDUAL')]
FLAGS = tuple(n.lower() for _, n in SWITCHES) + ('cdt',)   # notebook 05's, 06's and 07's switches; cdt: inductor's coordinate-descent tuning

def config_fields(over:dict) -> dict: return {k: v for k, v in over.items() if k != 'mode' and k not in FLAGS}


def parse_variants(spec:str) -> dict:
    """'h128:n_heads=6;gqa:n_heads=6,n_kv_heads=2' -> {'h128': {'n_heads': 6}, 'gqa': {'n_heads': 6, 'n_kv_heads': 2}}.
    Besides ModelConfig fields: `mode=...` compiles the row in that torch.compile mode (timing only: no quality run), and
    notebook 05's, 06's and 07's switches by their lower-case names (`fused_qkv_rope=0`, `fused_swiglu=0`, `fp8_head=1`, ...) and `cdt=1` (inductor's
    coordinate-descent tuning of its kernels) hold for its row and quality run."""
    out = {}
    for item in [v for v in spec.split(';') if v.strip()]:
        name, _, kvs = item.partition(':')
        if not name.strip() or not kvs: raise SystemExit(f'--gpt2-variants: {item!r} is not NAME:field=value,...')
        over = {}
        for kv in kvs.split(','):
            k, _, v = kv.partition('=')
            if k.strip() == 'mode': over['mode'] = v.strip(); continue  # the torch.compile mode of the row (timing only)
            if k.strip() in FLAGS: over[k.strip()] = v.strip().lower() in ('1', 'true', 'yes'); continue
            if k.strip() not in ModelConfig.__dataclass_fields__: raise SystemExit(f'--gpt2-variants: {k.strip()!r} is neither a ModelConfig field nor a switch ({", ".join(FLAGS)})')
            kind = type(getattr(ModelConfig(), k.strip()))
            over[k.strip()] = v.strip().lower() in ('1', 'true', 'yes') if kind is bool else kind(v)  # bool('False') is True
        ModelConfig.preset('gpt2', **config_fields(over)).validate()
        out[name.strip()] = over
    return out


def quality_run(kind:str, ng, args, device, over:dict=None, seed:int|None=None) -> dict:
    "Train from scratch for `args.q_steps` steps on the prepared data; validation loss along the way (`over`: gpt2 fields changed)."
    T, V = args.T, args.q_vocab
    seed = args.seed if seed is None else seed
    torch.manual_seed(seed)
    if kind == 'nanogpt':
        model = ng.GPT(nanogpt_config(ng, V, args.tiny, T)).to(device)
        opt = model.configure_optimizers(args.q_wd, args.q_lr, (0.9, 0.95), device.type)
    else:
        model = Transformer(metai_config('gpt2', args.tiny, vocab_size=V, max_seq_len=max(T, 64), **(over or {}))).to(device)
        opt = configure_optimizer(model, args.q_lr, args.q_wd, (0.9, 0.95), device.type)
    model.train()
    fwd = torch.compile(model) if args.q_compile else model
    loss_fn = (lambda x, y: fwd(x, y)[1]) if kind == 'nanogpt' else (lambda x, y: fwd(x, y, loss_only=True)[1])
    ds = LazyTextDataset(args.data_dir, T, split='train', seed=seed)  # a fresh reader: both models see the same batches
    val = LazyTextDataset(args.data_dir, T, split='val', seed=0)
    vx, vy = val.get_batch(len(val))  # every validation window, (Nv, T)
    curve, losses, t0 = [], [], time.perf_counter()
    params = list(model.parameters())
    warmup = max(1, args.q_steps // 10)
    for it in range(args.q_steps):
        for g in opt.param_groups: g['lr'] = lr_at(it, warmup, args.q_steps, args.q_lr, args.q_lr / 10)
        x, y = ds.get_batch(args.q_batch, device)
        with autocast(device): loss = loss_fn(x, y)
        loss.backward()
        if kind == 'nanogpt': torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step()  # its train.py
        else: clip_step(opt, params, 1.0, loss.detach())  # metai.train.loop's
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if (it + 1) % args.q_eval_every == 0 or it + 1 == args.q_steps:
            curve.append(dict(step=it + 1, tokens=(it + 1) * args.q_batch * T, val_loss=val_loss(model, loss_fn, vx, vy, device)))
    sync(device)
    train_losses = torch.stack(losses).float().cpu().tolist()
    r = dict(model=kind, overrides=over or {}, seed=seed, params=sum(p.numel() for p in model.parameters()), steps=args.q_steps, batch=args.q_batch, seq_len=T,
             tokens=args.q_steps * args.q_batch * T, seconds=round(time.perf_counter() - t0, 1), val_windows=len(vx),
             final_val_loss=curve[-1]['val_loss'], curve=curve,
             train_loss=[round(sum(train_losses[i:i + 10]) / len(train_losses[i:i + 10]), 4) for i in range(0, len(train_losses), 10)])
    print(f"quality {kind:8s}{' ' + str(over) if over else ''} val loss {r['final_val_loss']:.4f} after {r['tokens']:,} tokens ({r['seconds']} s)", flush=True)
    return r


def unigram_entropy(data_dir:str) -> float:
    "Entropy (nats) of the training split's token frequencies: the loss of the best model that ignores context."
    meta = read_meta(data_dir)
    toks = np.fromfile(os.path.join(data_dir, 'train.bin'), dtype=np.dtype(meta.get('dtype', 'uint16')))
    p = np.bincount(toks).astype(np.float64); p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cuda', help="'cuda' or 'cpu'")
    p.add_argument('--nanogpt-dir', required=True, help="folder holding nanoGPT's model.py (the baseline; not part of metai)")
    p.add_argument('--data-dir', default=None, help='a metai prepare-data folder for the quality check (none: skip it)')
    p.add_argument('--out', default='bench/results/train_h100.json', help='JSON results file (rewritten after each item)')
    p.add_argument('--tiny', action='store_true', help='toy sizes, to check the script on a CPU')
    p.add_argument('--no-compile', action='store_true', help='skip torch.compile (script check only)')
    p.add_argument('--batch', type=int, default=32, help='sequences per micro-batch')
    p.add_argument('--grad-accum', type=int, default=1, help='micro-batches per optimizer step')
    p.add_argument('--seq-len', type=int, default=1024, help='tokens per sequence')
    p.add_argument('--warmup', type=int, default=3, help='untimed steps (the first compiles)')
    p.add_argument('--iters', type=int, default=10, help='timed steps')
    p.add_argument('--only', default='', help="comma list of row names to time (e.g. 'metai small,metai small (reduce-overhead)'; ';' between names that hold a comma); default all")
    p.add_argument('--extra-modes', default='', help="comma list of torch.compile modes to time metai (and nanoGPT) in too, e.g. reduce-overhead")
    p.add_argument('--no-profile', action='store_true', help='skip the torch.profiler breakdown')
    p.add_argument('--inductor-ce', action='store_true', help="also time metai gpt2 and small with inductor's loss instead of `cross_entropy_rows` (notebook 07's FUSED_CE off)")
    p.add_argument('--fp32-residual', action='store_true', help="also time (and train in the quality check) metai with the residual stream in fp32 under autocast (notebook 07's BF16_RESIDUAL off)")
    p.add_argument('--gpt2-variants', default='', help="rows (and quality runs) of the gpt2 preset with fields changed: 'NAME:field=value,...;...', e.g. 'h128:n_heads=6' (mode=reduce-overhead: time that row as CUDA graphs, no quality run; fused_qkv_rope=0, fused_swiglu=0, fp8_head=0 and notebook 05's, 06's and 07's other switches; cdt=1: inductor's coordinate-descent tuning)")
    p.add_argument('--head-apart', action='store_true', help="also time metai gpt2 and small with the head's product and the loss apart (notebook 07's FUSED_HEAD_CE off)")
    p.add_argument('--bf16-head', action='store_true', help="also time (and train in the quality check) metai with the head's products in bf16 (notebook 07's FP8_HEAD off)")
    p.add_argument('--separate-clip', action='store_true', help="also time metai gpt2 and small clipping with clip_grad_norm_ before the step (not inside the fused AdamW)")
    p.add_argument('--q-steps', type=int, default=200, help='quality check: optimizer steps per model')
    p.add_argument('--q-batch', type=int, default=16, help='quality check: sequences per step')
    p.add_argument('--q-lr', type=float, default=6e-4, help="quality check: peak learning rate (nanoGPT's GPT-2 default)")
    p.add_argument('--q-wd', type=float, default=0.1, help='quality check: AdamW weight decay')
    p.add_argument('--q-eval-every', type=int, default=25, help='quality check: steps between validation passes')
    p.add_argument('--q-compile', action='store_true', help='quality check: compile both models (default eager: same losses, no compile time)')
    p.add_argument('--seed', type=int, default=0, help='seed of the initial weights and of the data order')
    p.add_argument('--q-seeds', default='', help="quality check: comma list of seeds, every run repeated with each (run-to-run spread); default --seed")
    p.add_argument('--time-budget', type=float, default=1e9, help='seconds; items that would not fit are skipped')
    args = p.parse_args(argv)
    device = get_device(args.device)
    set_matmul_precision(); seed_everything(0)
    budget = Budget(args.time_budget)
    ng = load_nanogpt(args.nanogpt_dir)
    if args.tiny: args.batch, args.seq_len, args.iters, args.warmup = 2, 64, 3, 2
    args.T = args.seq_len
    args.variants = parse_variants(args.gpt2_variants)
    args.vocab_of = lambda m: m.config.vocab_size if hasattr(m, 'config') else m.cfg.vocab_size
    compile_ = (lambda m: m) if args.no_compile else torch.compile
    profile = not args.no_profile
    res = dict(benchmark='train', what='training step: fwd + bwd + clip + fused AdamW, bf16 autocast (fp32 weights)',
               peak_flops=PEAK_BF16, info=card_info(device),
               settings={k: v for k, v in vars(args).items() if k not in ('vocab_of', 'variants')}, results=[], skipped=[], errors=[])
    res['nanogpt_source'] = nanogpt_source(args.nanogpt_dir)
    print(f"card: {res['info']['card']}  torch {torch.__version__}  nanoGPT {res['nanogpt_source']}", flush=True)

    def save(): save_json(args.out, res)
    def skip(what, need):
        if budget.allows(need): return False
        res['skipped'].append(f'{what}: {budget.left():.0f} s left, needs about {need:.0f} s'); save(); return True

    # 1. throughput at equal batch and sequence length: nanoGPT first (the baseline), then metai gpt2 and small
    def build_nanogpt():
        torch.manual_seed(0)
        m = ng.GPT(nanogpt_config(ng, tiny=args.tiny)).to(device).train()
        opt = m.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device.type)
        c = compile_(m)
        return m, (lambda x, y: c(x, y)[1]), opt
    def build_metai(name, mode='default', over=None):
        def build():
            torch.manual_seed(0)
            cfg = metai_config(name, args.tiny, **(over or {}))
            m = Transformer(cfg).to(device).train()
            opt = configure_optimizer(m, 6e-4, 0.1, (0.9, 0.95), device.type)
            c = m if args.no_compile else torch.compile(m, mode=compile_mode(mode))  # as metai.train.loop does: the whole model, called with targets
            return m, (lambda x, y: c(x, y, loss_only=True)[1]), opt
        return build
    def build_nanogpt_mode(mode):
        def build():
            m, _, opt = build_nanogpt()
            c = m if args.no_compile else torch.compile(m, mode=compile_mode(mode))
            return m, (lambda x, y: c(x, y)[1]), opt
        return build
    items = [('nanoGPT gpt2-124M', build_nanogpt, lambda m: nanogpt_flops_per_token(m, args.T), dict(impl='nanoGPT', model='gpt2')),
             ('metai gpt2', build_metai('gpt2'), lambda m: m.cfg.flops_per_token(args.T, training=True), dict(impl='metai', model='gpt2')),
             ('metai small', build_metai('small'), lambda m: m.cfg.flops_per_token(args.T, training=True), dict(impl='metai', model='small'))]
    for mode in [m for m in args.extra_modes.split(',') if m]:  # the same steps compiled in another torch.compile mode
        items += [(f'metai gpt2 ({mode})', build_metai('gpt2', mode), items[1][2], dict(impl='metai', model='gpt2', compile_mode=mode)),
                  (f'metai small ({mode})', build_metai('small', mode), items[2][2], dict(impl='metai', model='small', compile_mode=mode)),
                  (f'nanoGPT gpt2-124M ({mode})', build_nanogpt_mode(mode), items[0][2], dict(impl='nanoGPT', model='gpt2', compile_mode=mode))]
    if args.head_apart:  # the same steps with the head's product and the loss apart (`cross_entropy_rows`), logits kept for the backward
        items += [('metai gpt2 (head apart)', build_metai('gpt2'), items[1][2], dict(impl='metai', model='gpt2', fused_head_ce=False)),
                  ('metai small (head apart)', build_metai('small'), items[2][2], dict(impl='metai', model='small', fused_head_ce=False))]
        for mode in [m for m in args.extra_modes.split(',') if m]:
            items += [(f'metai small ({mode}, head apart)', build_metai('small', mode), items[2][2],
                       dict(impl='metai', model='small', compile_mode=mode, fused_head_ce=False))]
    if args.bf16_head:  # the same steps with the head's three products in bf16 (notebook 07's FP8_HEAD off)
        items += [('metai gpt2 (bf16 head)', build_metai('gpt2'), items[1][2], dict(impl='metai', model='gpt2', fp8_head=False)),
                  ('metai small (bf16 head)', build_metai('small'), items[2][2], dict(impl='metai', model='small', fp8_head=False))]
        for mode in [m for m in args.extra_modes.split(',') if m]:
            items += [(f'metai gpt2 ({mode}, bf16 head)', build_metai('gpt2', mode), items[1][2], dict(impl='metai', model='gpt2', compile_mode=mode, fp8_head=False)),
                      (f'metai small ({mode}, bf16 head)', build_metai('small', mode), items[2][2], dict(impl='metai', model='small', compile_mode=mode, fp8_head=False))]
    if args.separate_clip:  # the same steps clipped by clip_grad_norm_ (a pass of its own) and without the finite test
        items += [('metai gpt2 (separate clip)', build_metai('gpt2'), items[1][2], dict(impl='metai', model='gpt2', separate_clip=True)),
                  ('metai small (separate clip)', build_metai('small'), items[2][2], dict(impl='metai', model='small', separate_clip=True))]
    if args.fp32_residual:  # the same steps with the residual stream in fp32 under autocast (notebook 07's BF16_RESIDUAL off)
        items += [('metai gpt2 (fp32 residual)', build_metai('gpt2'), items[1][2], dict(impl='metai', model='gpt2', bf16_residual=False)),
                  ('metai small (fp32 residual)', build_metai('small'), items[2][2], dict(impl='metai', model='small', bf16_residual=False))]
        for mode in [m for m in args.extra_modes.split(',') if m]:
            items += [(f'metai small ({mode}, fp32 residual)', build_metai('small', mode), items[2][2],
                       dict(impl='metai', model='small', compile_mode=mode, bf16_residual=False))]
    if args.inductor_ce:  # the same steps with inductor's loss instead of the two Triton kernels of `cross_entropy_rows`
        items += [('metai gpt2 (inductor CE)', build_metai('gpt2'), items[1][2], dict(impl='metai', model='gpt2', fused_ce=False)),
                  ('metai small (inductor CE)', build_metai('small'), items[2][2], dict(impl='metai', model='small', fused_ce=False))]
    for vname, over in args.variants.items():  # the gpt2 preset with some fields changed (same batch, sequence, vocabulary)
        mode, fields = over.get('mode', 'default'), config_fields(over)
        items += [(f'metai gpt2 [{vname}]', build_metai('gpt2', mode, over=fields), items[1][2],
                   dict(impl='metai', model='gpt2', variant=vname, overrides=fields, **{k: over[k] for k in FLAGS if k in over},
                        **({'compile_mode': mode} if mode != 'default' else {})))]
    if args.only:  # in the order given
        want = args.only.split(';' if ';' in args.only else ','); items = sorted([it for it in items if it[0] in want], key=lambda it: want.index(it[0]))
    res['defaults'] = {n: getattr(m, n) for m, n in SWITCHES}
    for name, build, flops_fn, extra in items:
        if skip(name, 75): continue
        try:
            with library_flags(extra): res['results'].append(throughput(name, build, device, args, flops_fn, extra, profile))
        except Exception as e: res['errors'].append(f'{name}: {short_error(e)}')
        free(device); save()
    by = {r['name']: r for r in res['results']}
    if 'metai gpt2' in by and 'nanoGPT gpt2-124M' in by:
        res['ratios'] = dict(metai_gpt2_vs_nanogpt=round(by['metai gpt2']['tokens_per_s'] / by['nanoGPT gpt2-124M']['tokens_per_s'], 3))
        for a in [r['name'] for r in res['results'] if r.get('variant') or r['name'].startswith('metai gpt2 (')]:  # every other gpt2 row
            res['ratios'][f'{a} vs nanoGPT gpt2-124M'] = round(by[a]['tokens_per_s'] / by['nanoGPT gpt2-124M']['tokens_per_s'], 3)
        for mode in [m for m in args.extra_modes.split(',') if m]:
            for a, b in ((f'metai gpt2 ({mode})', 'nanoGPT gpt2-124M'), (f'metai gpt2 ({mode})', f'nanoGPT gpt2-124M ({mode})')):
                if a in by and b in by: res['ratios'][f'{a} vs {b}'] = round(by[a]['tokens_per_s'] / by[b]['tokens_per_s'], 3)
    res['targets'] = dict(metai_gpt2_vs_nanogpt=1.2, metai_small_mfu=0.30)
    save()

    # 2. quality at equal tokens: the same data, batches, schedule and budget for metai gpt2 and nanoGPT
    if args.data_dir:
        meta = read_meta(args.data_dir)
        args.q_vocab = int(meta['tokenizer']['vocab_size']) if meta else 8192
        if args.tiny: args.q_steps, args.q_batch, args.q_eval_every = 6, 2, 3
        q = dict(data_dir=os.path.basename(os.path.normpath(args.data_dir)), vocab_size=args.q_vocab,
                 train_tokens=meta.get('splits', {}).get('train', {}).get('tokens'), val_tokens=meta.get('splits', {}).get('val', {}).get('tokens'),
                 steps=args.q_steps, batch=args.q_batch, seq_len=args.T, lr=args.q_lr, min_lr=args.q_lr / 10,
                 warmup=max(1, args.q_steps // 10), weight_decay=args.q_wd, compiled=args.q_compile, runs={})
        try: q['unigram_entropy'] = round(unigram_entropy(args.data_dir), 4)
        except Exception as e: q['unigram_entropy_error'] = short_error(e)
        res['quality'] = q
        runs = [('metai', 'metai', None, {}), ('nanogpt', 'nanogpt', None, {})] + [(f'metai [{v}]', 'metai', config_fields(o), {k: o[k] for k in FLAGS if k in o})
                                                                             for v, o in args.variants.items() if 'mode' not in o]
        if args.fp32_residual: runs.append(('metai (fp32 residual)', 'metai', None, dict(bf16_residual=False)))
        if args.head_apart: runs.append(('metai (head apart)', 'metai', None, dict(fused_head_ce=False)))
        if args.bf16_head: runs.append(('metai (bf16 head)', 'metai', None, dict(fp8_head=False)))
        seeds = [int(v) for v in args.q_seeds.split(',')] if args.q_seeds else [args.seed]
        runs = [(key if s == seeds[0] else f'{key} (seed {s})', kind, over, flags, s) for s in seeds for key, kind, over, flags in runs]
        for key, kind, over, flags, seed in runs:
            if skip(f'quality {key}', 45): continue
            try:
                with library_flags(flags): q['runs'][key] = dict(quality_run(kind, ng, args, device, over, seed), **({'switches': flags} if flags else {}))
            except Exception as e: res['errors'].append(f'quality {key}: {short_error(e)}')
            free(device); save()
        for key in [k for k in q['runs'] if k.startswith('metai')]:  # against nanoGPT with the same seed
            suffix = key[key.index(' (seed'):] if ' (seed' in key else ''
            if f'nanogpt{suffix}' in q['runs']:
                q[f'{key}_minus_nanogpt'.replace(' ', '_')] = round(q['runs'][key]['final_val_loss'] - q['runs'][f'nanogpt{suffix}']['final_val_loss'], 4)

    res['elapsed_s'] = round(time.perf_counter() - budget.t0, 1)
    save()
    print(f"\n{'model':28s} {'tokens/s':>11s} {'MFU':>6s} {'peak GB':>8s}")
    for r in res['results']:
        print(f"{r['name']:28s} {r['tokens_per_s']:>11,} {r['mfu'] if r['mfu'] is not None else float('nan'):6.3f} {r['peak_mem_gb']!s:>8s}")
    for k, v in res.get('ratios', {}).items(): print(f'{k}: {v:.3f}x')
    if 'quality' in res:
        for k, r in res['quality']['runs'].items(): print(f"val loss {k}: {r['final_val_loss']:.4f} ({r['params']:,} parameters)")
    for s in res['skipped'] + res['errors']: print('!', s)
    print(f"wrote {args.out} in {res['elapsed_s']} s")


if __name__ == '__main__':
    main()
