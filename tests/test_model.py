"The exported model: preset parameter counts on the meta device, loss and gradients, MTP indexing, cached decoding, bad input."
import math, dataclasses
import pytest
import torch
import torch.nn.functional as F
from metai.config import ModelConfig
from metai.model.transformer import Transformer, Block, MTPModule
from metai.model.moe import Gate, moe_update_bias

torch.set_num_threads(1)

DENSE = ModelConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64, norm_eps=1e-5)
MOE = dataclasses.replace(DENSE, n_routed_experts=8, n_activated_experts=2, moe_ffn_dim=32, score_func='softmax',
                          aux_loss_alpha=0.01, tie_embeddings=True)
DS = ModelConfig.preset('ds-tiny', vocab_size=256, dim=64, n_layers=3, n_heads=4, q_lora_rank=32, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_dim=128, n_routed_experts=8,
                        n_activated_experts=2, moe_ffn_dim=32, n_expert_groups=4, n_limited_groups=2, mtp_depth=2, max_seq_len=64)
MLA_NO_QLORA = dataclasses.replace(DS, q_lora_rank=0, mtp_depth=0)
FAMILIES = {'dense': DENSE, 'moe': MOE, 'deepseek': DS, 'mla-no-qlora': MLA_NO_QLORA}

def batch(c, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, c.vocab_size, (B, T + 1), generator=g)
    return s[:, :-1], s[:, 1:]

def model(c, seed=0):
    torch.manual_seed(seed)
    return Transformer(c)

class ToyCache:
    "Growing per-layer cache speaking attention's protocol: update(layer_id, start_pos, a, b) -> all entries so far."
    def __init__(self): self.a, self.b = {}, {}
    def update(self, layer_id, start_pos, a, b):
        if start_pos == 0: self.a[layer_id], self.b[layer_id] = a, b
        else:
            assert self.a[layer_id].size(1) == start_pos
            self.a[layer_id] = torch.cat([self.a[layer_id], a], 1); self.b[layer_id] = torch.cat([self.b[layer_id], b], 1)
        return self.a[layer_id], self.b[layer_id]

# --- parameter counts -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['micro', 'small', 'gpt2', 'llama3-8b', 'ds-tiny', 'deepseek-v3', 'deepseek-v3.2'])
def test_preset_counts_on_meta(name):
    c = ModelConfig.preset(name)
    with torch.device('meta'): m = Transformer(c)
    assert m.embed.weight.is_meta
    main, mtp = c.num_params(), c.mtp_params()          # the accounting, DeepSeek-V3.2's indexers included (notebook 19)
    assert m.num_params() == main
    assert m.num_params(include_mtp=True) - m.num_params() == mtp
    if name == 'deepseek-v3': assert (main, mtp) == (671_026_419_200, 11_610_068_224)
    if name == 'deepseek-v3.2':  # V3 plus one 13,959,424-parameter indexer in each of the 61 layers and the MTP layer
        assert (main, mtp) == (671_026_419_200 + 61 * 13_959_424, 11_610_068_224 + 13_959_424)
        assert sum(p.numel() for n, p in m.named_parameters() if '.indexer.' in n) == 62 * 13_959_424
    if name == 'llama3-8b': assert main == 8_030_261_248

def test_block_params_match_accounting():
    for c in FAMILIES.values():
        for i in range(c.n_layers + 1):
            assert sum(p.numel() for p in Block(c, i).parameters()) == c.layer_params(i), (c, i)

def test_names_tying_and_buffers():
    m = model(DS)
    sd = m.state_dict()
    for k in ['embed.weight', 'layers.0.attn_norm.weight', 'layers.0.attn.wq_a.weight', 'layers.0.attn.wkv_b.weight',
              'layers.0.ffn_norm.weight', 'layers.0.ffn.w1.weight', 'layers.1.ffn.gate.weight', 'layers.1.ffn.gate.bias',
              'layers.1.ffn.w1', 'layers.1.ffn.w2', 'layers.1.ffn.w3', 'layers.1.ffn.shared_experts.w2.weight', 'norm.weight',
              'head.weight', 'mtp.0.enorm.weight', 'mtp.0.hnorm.weight', 'mtp.0.eh_proj.weight', 'mtp.0.block.attn.wo.weight',
              'mtp.1.block.ffn.gate.weight', 'mtp.1.norm.weight']:
        assert k in sd, k
    assert 'freqs_cos' not in sd and 'freqs_sin' not in sd           # non-persistent
    assert m.head.weight is not m.embed.weight                         # DeepSeek: untied
    assert m.mtp[1].block.layer_id == DS.n_layers + 1 and m.mtp[0].eh_proj.weight.shape == (64, 128)
    assert isinstance(m.mtp[0], MTPModule) and len(m.mtp) == 2
    t = model(MOE)
    assert t.head.weight is t.embed.weight
    assert t.num_params() == MOE.num_params()                          # the tied table counted once

def test_init():
    c = ModelConfig.preset('small', n_layers=4, vocab_size=1024, max_seq_len=64)
    p = dict(model(c).named_parameters())
    out_std = c.init_std / math.sqrt(2 * c.n_layers)
    assert abs(p['layers.0.attn.wq.weight'].std().item() - c.init_std) < 1e-3
    for k in ['layers.0.attn.wo.weight', 'layers.0.ffn.w2', 'layers.0.ffn.w1']:
        want = out_std if k.endswith(('wo.weight', 'w2')) else c.init_std
        assert abs(p[k].std().item() - want) < 1e-3, k
    assert (p['norm.weight'] == 1).all()
    g = dict(model(DS).named_parameters())
    assert (g['layers.1.ffn.gate.bias'] == 0).all() and not g['layers.1.ffn.gate.bias'].requires_grad

def test_meta_build_then_load_gives_same_model():
    src = model(DS).eval()
    with torch.device('meta'): m = Transformer(DS)
    m = m.to_empty(device='cpu'); m.init_freqs()
    m.load_state_dict(src.state_dict()); m.eval()
    x, _ = batch(DS)
    with torch.no_grad(): assert torch.equal(m(x)[0], src(x)[0])

# --- forward, loss, gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize('fam', list(FAMILIES))
def test_forward_backward(fam):
    c = FAMILIES[fam]; m = model(c); x, y = batch(c)
    logits, loss, aux = m(x, y)
    assert logits.shape == (2, 16, c.vocab_size) and logits.dtype == torch.float32
    assert abs(aux['ce'].item() - math.log(c.vocab_size)) < 0.05
    want = aux['ce'] + aux['moe_aux_loss'] + (c.mtp_loss_weight * aux['mtp_loss'] if c.mtp_depth else 0)
    assert torch.allclose(loss.detach(), want, atol=1e-5)
    assert set(aux) == {'ce', 'moe_aux_loss', 'mtp_loss', 'index_loss', 'load', 'mtp_logits', 'hidden'}
    assert [t.shape for t in aux['mtp_logits']] == [(2, 16 - k, c.vocab_size) for k in range(1, c.mtp_depth + 1)]
    assert (aux['load'] is None) == (not c.is_moe)
    loss.backward()
    for n, p in m.named_parameters():
        if p.requires_grad: assert p.grad is not None and torch.isfinite(p.grad).all(), n

def test_no_targets_and_mtp_switches():
    m = model(DS); x, y = batch(DS)
    logits, loss, aux = m(x)
    assert loss is None and aux['ce'] is None and aux['mtp_logits'] == [] and aux['mtp_loss'] is None
    assert len(m(x, use_mtp=True)[2]['mtp_logits']) == 2
    assert m(x, y, use_mtp=False)[2]['mtp_loss'] is None
    m.mtp_enabled = False
    _, loss, aux = m(x, y)
    assert aux['mtp_loss'] is None and torch.allclose(loss.detach(), aux['ce'] + aux['moe_aux_loss'])
    # load rows always match the gates, so the bias update can take them as they come
    gates = [g for g in m.modules() if isinstance(g, Gate)]
    assert aux['load'].shape == (len(gates), DS.n_routed_experts) and aux['load'][-2:].sum() == 0
    assert moe_update_bias(m, aux['load']) == len(gates)

def test_masked_targets():
    m = model(DENSE); x, y = batch(DENSE)
    logits, _, _ = m(x, y)
    ym = y.clone(); ym[:, :8] = -100
    ce = m(x, ym)[2]['ce']
    assert torch.allclose(ce, F.cross_entropy(logits[:, 8:].flatten(0, 1), y[:, 8:].flatten()), atol=1e-5)
    assert m(x, torch.full_like(y, -100))[1].item() == 0.0

def test_overfits_one_batch():
    m = model(DS); x, y = batch(DS, B=4, T=32)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(30):
        _, loss, aux = m(x, y)
        opt.zero_grad(); loss.backward(); opt.step()
        first = first or (aux['ce'].item(), aux['mtp_loss'].item())
    assert aux['ce'].item() < 0.25 * first[0] and aux['mtp_loss'].item() < 0.5 * first[1], (first, aux['ce'], aux['mtp_loss'])

# --- MTP indexing ------------------------------------------------------------------------------------------------

def test_mtp_matches_paper_indexing():
    m = model(DS).eval(); x, y = batch(DS, T=12); T = 12
    _, _, aux = m(x, y)
    s = torch.cat([x, y[:, -1:]], 1)  # t_0..t_T
    h, ces = aux['hidden'], []
    for k in (1, 2):
        i = torch.arange(T - k)
        lk, h, _ = m.mtp_forward(k - 1, h[:, i], s[:, i + k])
        assert torch.allclose(lk, aux['mtp_logits'][k - 1], atol=1e-5)
        ces.append(F.cross_entropy(lk.flatten(0, 1), s[:, i + k + 1].flatten()))
    assert torch.allclose(aux['mtp_loss'], sum(ces) / 2, atol=1e-5)

@pytest.mark.parametrize('j', [0, 5, 11])
def test_mtp_is_causal(j):
    "Depth k's logits at position i depend on t_0..t_{i+k} only."
    m = model(DS).eval(); x, _ = batch(DS, T=12)
    x2 = x.clone(); x2[:, j] = (x2[:, j] + 1) % DS.vocab_size
    with torch.no_grad():
        l1, _, a1 = m(x, use_mtp=True); l2, _, a2 = m(x2, use_mtp=True)
    for k, (u, v) in enumerate([(l1, l2)] + list(zip(a1['mtp_logits'], a2['mtp_logits']))):
        changed = ((u - v).abs().amax(dim=(0, 2)) > 1e-6).nonzero().flatten().tolist()
        assert changed == list(range(max(j - k, 0), 12 - k)), (k, changed)

# --- cached decoding -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('fam', list(FAMILIES))
def test_cached_decode_matches_full(fam):
    c = FAMILIES[fam]; m = model(c, seed=1).eval(); x, _ = batch(c, T=12)
    cache = ToyCache()
    with torch.no_grad():
        full = m(x)[0]
        steps = [m(x[:, :5], cache=cache)[0]] + [m(x[:, t:t+1], start_pos=t, cache=cache)[0] for t in range(5, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)

def test_mtp_drafting_with_cache():
    m = model(DS, seed=1).eval(); x, _ = batch(DS, T=10)
    cache, steps = ToyCache(), []
    with torch.no_grad():
        ref = m(x, use_mtp=True)[2]['mtp_logits'][0]
        for t in range(9):
            a = m(x[:, t:t+1], start_pos=t, cache=cache)[2]
            steps.append(m.mtp_forward(0, a['hidden'], x[:, t+1:t+2], start_pos=t, cache=cache)[0])
    assert torch.allclose(torch.cat(steps, 1), ref, atol=1e-4)

# --- compile ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('fam', ['dense', 'deepseek'])
def test_no_graph_breaks(fam):
    torch._dynamo.reset()
    c = FAMILIES[fam]; m = model(c); x, y = batch(c)
    e = torch._dynamo.explain(m)(x, y)
    torch._dynamo.reset()
    assert e.graph_break_count == 0, e.break_reasons

# --- bad input ----------------------------------------------------------------------------------------------------

def test_bad_input():
    m = model(DENSE); x, y = batch(DENSE)
    with pytest.raises(ValueError, match=r'tokens: expected shape \(B, T\)'): m(x[0])
    with pytest.raises(ValueError, match='exceed max_seq_len=64'): m(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match='exceed max_seq_len=64'): m(x[:, :1], start_pos=64)
    with pytest.raises(ValueError, match='targets: shape'): m(x, y[:, :3])
    with pytest.raises(ValueError, match='n_kv_heads'): Transformer(dataclasses.replace(DENSE, n_kv_heads=3))

def test_package_import():
    from metai.model import Transformer as T
    assert T is Transformer

def test_compiled_backward_matches_eager():
    "Inductor once returned the loss without a gradient when a constant-zero term was added to it (see notebook 07)."
    torch._dynamo.reset()
    m = model(DENSE); x, y = batch(DENSE)
    _, le, _ = m(x, y); le.backward()
    ge = {n: p.grad.clone() for n, p in m.named_parameters()}; m.zero_grad()
    _, lc, _ = torch.compile(m, fullgraph=True)(x, y)
    assert lc.requires_grad
    lc.backward()
    torch._dynamo.reset()
    assert torch.allclose(lc.detach(), le.detach(), atol=1e-5)
    for n, p in m.named_parameters(): assert torch.allclose(p.grad, ge[n], rtol=1e-3, atol=1e-6), n

def test_bench_model_script_runs(tmp_path):
    "scripts/bench_model.py end to end on the CPU at toy sizes: every row it is asked for, and the ratios between them."
    import json, os, subprocess, sys
    from pathlib import Path
    root, out = Path(__file__).resolve().parent.parent, tmp_path / 'model.json'
    r = subprocess.run([sys.executable, 'scripts/bench_model.py', '--device', 'cpu', '--tiny', '--no-compile', '--models', 'ds-mla,hf',
                        '--extra-modes', 'reduce-overhead', '--skip-eager', '--no-profile', '--iters', '2', '--warmup', '1',
                        '--out', str(out)], cwd=root, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert not res['errors'], res['errors']
    names = {x['name'] for x in res['results']}
    assert names == {'metai ds-mla (compiled)', 'metai ds-mla (compiled, bf16 weights)', 'metai ds-mla (compiled reduce-overhead)',
                     'metai ds-mla (compiled reduce-overhead, bf16 weights)', 'transformers DeepseekV3 (compiled, bf16 weights)',
                     'transformers DeepseekV3 (compiled reduce-overhead, bf16 weights)'}, names
    assert all(x['tokens_per_s'] > 0 for x in res['results'])
    assert abs(res['parity']['abs_diff']) < 1e-2  # the same weights give the same loss in both
    assert res['ratios']['metai_vs_transformers_compiled'] > 0

def test_bench_fp8_script_checks_the_arithmetic(tmp_path):
    "scripts/bench_fp8.py on the CPU: its per-tensor fp8 products match an fp32 product to fp8's precision, bf16 to bf16's."
    import json, os, subprocess, sys
    from pathlib import Path
    root, out = Path(__file__).resolve().parent.parent, tmp_path / 'fp8.json'
    r = subprocess.run([sys.executable, 'scripts/bench_fp8.py', '--device', 'cpu', '--tiny', '--iters', '2', '--out', str(out)],
                       cwd=root, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert not res['errors'] and len(res['shapes']) == 2, res['errors']
    for s in res['shapes']:
        assert max(s['bf16_rel_err']) < 1e-2 and max(s['fp8_rel_err']) < 0.1, s  # e5m2 gradients: about 6%
        assert min(s['fp8_rel_err']) > 1e-3, s  # it really went through 8 bits

def _compiled_gpt2_steps(loss_only:bool, fused:tuple=(False, True), fp8:bool=False) -> list:
    """(loss, model with its .grad) of one compiled 2-layer gpt2-shaped step in bf16 autocast, with FUSED_CE off, then on;
    the head's products in fp8 only with `fp8` (FP8_HEAD, on by default in the library, is set for the call)."""
    import metai.model.transformer as T
    from metai.core import autocast
    c, out, default, default_fp8 = ModelConfig.preset('gpt2', n_layers=2), [], T.FUSED_CE, T.FP8_HEAD
    for fused_ce in fused:
        torch._dynamo.reset(); T.FUSED_CE, T.FP8_HEAD = fused_ce, fp8
        try:
            m = model(c).cuda(); xs, ys = [v.cuda() for v in batch(c, B=4, T=256)]
            with autocast('cuda'): logits, l, _ = torch.compile(m)(xs, ys, loss_only=loss_only)
            assert (logits is None) == loss_only  # loss_only: the fused head never keeps them
            l.backward()
        finally: T.FUSED_CE, T.FP8_HEAD = default, default_fp8
        out.append((l.item(), m))
    return out

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_fused_cross_entropy():
    """`cross_entropy_rows` on the GPU at gpt2's vocabulary (bf16 logits, ignored rows): losses and gradients as
    `F.cross_entropy`'s; and a compiled gpt2-shaped training step with `FUSED_CE` gives eager's loss and gradients."""
    import metai.model.transformer as T
    g = torch.Generator(device='cuda').manual_seed(0)
    x = (torch.randn(4096, 50304, device='cuda', generator=g) * 4).to(torch.bfloat16)
    t = torch.randint(0, 50304, (4096,), device='cuda', generator=g); t[::7] = -100
    xa, xr = x.clone().requires_grad_(), x.float().clone().requires_grad_()
    loss, lse = T.cross_entropy_rows(xa, t)
    ref = F.cross_entropy(xr, t, ignore_index=-100, reduction='none')
    w = torch.rand(4096, device='cuda', generator=g)
    (loss * w).sum().backward(); (ref * w).sum().backward()
    assert (loss - ref).abs().max() < 1e-3 and (lse - xr.detach().logsumexp(-1)).abs().max() < 1e-3
    assert (xa.grad.float() - xr.grad).abs().max() < 2e-3 * xr.grad.abs().max() + 1e-6
    (l0, m0), (l1, m1) = _compiled_gpt2_steps(loss_only=False)
    losses, grads = [l0, l1], [m0.embed.weight.grad.float(), m1.embed.weight.grad.float()]
    # the gradients are bf16 products of bf16 logit gradients, which both paths round to bf16 from fp32 in their own
    # order: one bf16 step is 0.4% of a value. The first H100 run (bench/results/cuda_test_fused_ce_h100_run1.log) had
    # equal losses and the embedding's gradient within 0.49% of its largest entry; 1e-3 of it was below bf16's step.
    rel = ((grads[0] - grads[1]).abs().max() / grads[0].abs().max()).item()
    assert abs(losses[0] - losses[1]) < 1e-3 and rel < 1e-2, (losses, rel)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_linear_cross_entropy():
    """`linear_cross_entropy` on the GPU at gpt2's vocabulary (bf16, ignored rows, more rows than its grid has
    programs): summed loss and the gradients of h and w as autograd's through `F.cross_entropy` in fp32; and a compiled
    gpt2-shaped `loss_only` step (the fused head) gives the loss and gradients of the plain PyTorch loss."""
    import metai.model.transformer as T
    g = torch.Generator(device='cuda').manual_seed(0)
    h = torch.randn(4096, 768, device='cuda', generator=g).to(torch.bfloat16)
    w = (torch.randn(50304, 768, device='cuda', generator=g) * 0.1).to(torch.bfloat16)
    t = torch.randint(0, 50304, (4096,), device='cuda', generator=g); t[::7] = -100
    ha, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    hr, wr = h.float().clone().requires_grad_(), w.float().clone().requires_grad_()
    loss = T.linear_cross_entropy(ha, wa, t)[0]
    ref = F.cross_entropy(hr @ wr.T, t, ignore_index=-100, reduction='sum')
    (loss / 3510).backward(); (ref / 3510).backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert abs(loss.item() - ref.item()) < 1e-3 * ref.item(), (loss.item(), ref.item())
    assert rel(ha.grad, hr.grad) < 1e-2 and rel(wa.grad, wr.grad) < 1e-2, (rel(ha.grad, hr.grad), rel(wa.grad, wr.grad))
    (l0, m0), (l1, m1) = _compiled_gpt2_steps(loss_only=True)
    losses, grads = [l0, l1], [torch.cat([p.grad.float().flatten() for p in m.parameters()]) for m in (m0, m1)]
    assert abs(losses[0] - losses[1]) < 1e-3 and rel(grads[1], grads[0]) < 1e-2, (losses, rel(grads[1], grads[0]))

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason='needs fp8 products (sm89+)')
def test_cuda_linear_cross_entropy_fp8():
    """`linear_cross_entropy_fp8` on the GPU at gpt2's vocabulary and width: its e5m2 gradient is torch's rounding of
    `(softmax - onehot) * FP8_GRAD_SCALE` from the same logits (both layouts), as is its e4m3 copy of h; the summed loss within 1% of fp32's and
    the gradients of h and w within fp8's error (per-tensor e4m3 keeps about 3 bits, e5m2 2: a few % of the norm);
    and a compiled gpt2-shaped `loss_only` step with `FP8_HEAD` gives the bf16 step's loss and gradients within that."""
    import metai.model.transformer as T
    g = torch.Generator(device='cuda').manual_seed(0)
    N, D, V = 4096, 768, 50304
    h = torch.randn(N, D, device='cuda', generator=g).to(torch.bfloat16)
    w = (torch.randn(V, D, device='cuda', generator=g) * 0.1).to(torch.bfloat16)
    t = torch.randint(0, V, (N,), device='cuda', generator=g); t[::7] = -100
    x = (torch.randn(N, V, device='cuda', generator=g) * 4).to(torch.bfloat16)
    loss, lse = T.cross_entropy_rows(x, t)
    d, dt = torch.empty(N, V, device='cuda', dtype=torch.float8_e5m2), torch.empty(V, N, device='cuda', dtype=torch.float8_e5m2)
    T._tiled(T.ce_grad_fp8_kernel, N, V, x, t, lse, d, dt, N, V, T.FP8_GRAD_SCALE)
    keep = (t != -100).float()[:, None]
    want = ((torch.softmax(x.float(), -1) - F.one_hot(t.clamp(min=0), V).float()) * keep * T.FP8_GRAD_SCALE).to(torch.float8_e5m2)
    same = (d.float() == want.float()).float().mean().item()
    assert same > 0.999 and torch.equal(dt.T.float(), d.float()), same   # exp's last bit may tip a rounding: rarely
    kept = (t != -100).nonzero().squeeze(1)                               # the one-hot term: 1/V of the entries, so apart
    assert (d.float()[kept, t[kept]] < 0).all() and (d.float()[t == -100] == 0).all()
    h8, h8t, sh = T.to_e4m3(h)                                            # the cast kernel: torch's rounding, both layouts
    want = (h.float() / sh).to(torch.float8_e4m3fn)
    assert torch.equal(h8.float(), want.float()) and torch.equal(h8t.T.float(), want.float())
    assert torch.equal(sh, h.float().abs().max() / 448)
    ha, wa = h.clone().requires_grad_(), w.clone().requires_grad_()
    hr, wr = h.float().clone().requires_grad_(), w.float().clone().requires_grad_()
    loss = T.linear_cross_entropy_fp8(ha, wa, t)[0]
    ref = F.cross_entropy(hr @ wr.T, t, ignore_index=-100, reduction='sum')
    (loss / 3510).backward(); (ref / 3510).backward()
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item(), (loss.item(), ref.item())
    assert rel(ha.grad, hr.grad) < 0.06 and rel(wa.grad, wr.grad) < 0.06, (rel(ha.grad, hr.grad), rel(wa.grad, wr.grad))
    (l1, m1), = _compiled_gpt2_steps(loss_only=True, fused=(True,), fp8=True)
    (l0, m0), = _compiled_gpt2_steps(loss_only=True, fused=(True,), fp8=False)
    g0, g1 = [torch.cat([p.grad.float().flatten() for p in m.parameters()]) for m in (m0, m1)]
    assert abs(l0 - l1) < 1e-2 * l0 and rel(g1, g0) < 0.06, (l0, l1, rel(g1, g0))

# --- DeepSeek-V3.2's indexer loss (notebook 19) -------------------------------------------------------------------

def _dsa_model(**kw):
    c = ModelConfig.preset('ds-tiny', vocab_size=256, n_layers=2, index_n_heads=6, index_head_dim=16, index_topk=4,
                           max_seq_len=32, mtp_depth=1, **kw)
    torch.manual_seed(0)
    return Transformer(c).train()

def test_index_loss_only_from_blocks_that_ran():
    "A training forward without the MTP modules (or too short for them) backpropagates, with the main layers' loss alone."
    m = _dsa_model()
    tok = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(0))
    _, loss, aux = m(tok[:, :-1], tok[:, 1:]); loss.backward()   # the MTP block ran: its indexer's loss is in
    assert m.mtp[0].block.attn.index_loss is not None
    for kw, T in ((dict(use_mtp=False), 12), ({}, 1)):            # then calls where it does not run
        m.zero_grad()
        _, loss, aux = m(tok[:, :T], tok[:, 1:T + 1], **kw)
        loss.backward()                                           # no stale loss from the earlier graph
        want = sum(l.attn.index_loss for l in m.layers) / len(m.layers)
        torch.testing.assert_close(aux['index_loss'], want.detach())
    with torch.no_grad(): assert m.eval()(tok)[2]['index_loss'] is None

def test_index_loss_keeps_no_score_tensor_for_backward():
    "The indexer's (B, T, H_I, S) scores are recomputed in the backward (a checkpoint), not saved by the forward."
    m = _dsa_model(mtp_loss_weight=0.3)
    tok = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(1))
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        _, loss, aux = m(tok[:, :-1], tok[:, 1:])
    assert aux['index_loss'] > 0 and shapes
    assert not [s for s in shapes if len(s) == 4 and s[-2:] == (6, 24)], 'a (B, T, 6, S) tensor was saved'
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in m.named_parameters() if '.indexer.' in n)

def test_custom_op_defined_again_keeps_the_first():
    """A notebook re-running an exported cell after the package module was imported (nbdev-test runs several notebooks
    in one worker) must not re-register the operator: torch would drop the registration the module's op object uses."""
    import metai.model.moe as M
    from metai.core import custom_op
    @custom_op('metai::grouped_mm', mutates_args=())
    def again(x:torch.Tensor, w:torch.Tensor, offs:torch.Tensor) -> torch.Tensor: raise AssertionError('not this one')
    assert again is M.grouped_mm
    x, w = torch.randn(6, 4), torch.randn(2, 4, 3)
    offs = torch.tensor([2, 6], dtype=torch.int32)
    torch.testing.assert_close(M.grouped_mm(x, w, offs), torch.cat([x[:2] @ w[0], x[2:] @ w[1]]))
