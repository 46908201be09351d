"`metai.model.moe` against transformers (DeepseekV3MoE, Mixtral's sparse block and its balance loss), a dense reference, torch.compile and CUDA."
import dataclasses
import pytest
import torch
import torch.nn.functional as F

from metai.config import ModelConfig
from metai.model.moe import FFN, Gate, MoE, gather_rows, grouped_mm, moe_dense, moe_experts, moe_update_bias

torch.set_num_threads(1)

def ds_cfg(**kw):
    c = dict(dim=64, n_routed_experts=16, n_activated_experts=4, moe_ffn_dim=32, n_shared_experts=1, score_func='sigmoid',
             n_expert_groups=4, n_limited_groups=2, route_scale=2.5, norm_topk_prob=True)
    return ModelConfig(**{**c, **kw})

def mixtral_cfg(**kw):
    c = dict(dim=64, n_routed_experts=8, n_activated_experts=2, moe_ffn_dim=48, score_func='softmax', norm_topk_prob=True)
    return ModelConfig(**{**c, **kw})

def randomize(moe, seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters(): p.copy_(torch.randn(p.shape, generator=g) * std)
    return moe

# --- transformers parity ------------------------------------------------------------------------------------------

def to_hf_deepseek(moe, cfg):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    hc = DeepseekV3Config(hidden_size=cfg.dim, moe_intermediate_size=cfg.moe_ffn_dim, n_routed_experts=cfg.n_routed_experts,
                          num_experts_per_tok=cfg.n_activated_experts, n_shared_experts=cfg.n_shared_experts, n_group=cfg.n_expert_groups,
                          topk_group=cfg.n_limited_groups, routed_scaling_factor=cfg.route_scale, norm_topk_prob=cfg.norm_topk_prob)
    hc._experts_implementation = 'eager'
    hf = DeepseekV3MoE(hc).eval()
    sd = {'gate.weight': moe.gate.weight, 'gate.e_score_correction_bias': moe.gate.bias,
          'experts.gate_up_proj': torch.cat([moe.w1, moe.w3], dim=1), 'experts.down_proj': moe.w2,
          'shared_experts.gate_proj.weight': moe.shared_experts.w1.weight, 'shared_experts.up_proj.weight': moe.shared_experts.w3.weight,
          'shared_experts.down_proj.weight': moe.shared_experts.w2.weight}
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected
    return hf

@pytest.mark.parametrize('kw', [dict(), dict(n_expert_groups=1, n_limited_groups=1), dict(n_shared_experts=2, n_activated_experts=6),
                                dict(n_routed_experts=32, n_expert_groups=8, n_limited_groups=4, n_activated_experts=8, route_scale=1.0),
                                dict(norm_topk_prob=False)])
def test_deepseek_v3_parity(kw):
    cfg = ds_cfg(**kw)
    moe = randomize(MoE(cfg))
    with torch.no_grad(): moe.gate.bias.normal_(std=0.05)  # the bias changes the selection
    hf = to_hf_deepseek(moe, cfg)
    x = torch.randn(2, 48, cfg.dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, aux = moe(x)
        y_hf = hf(x)
        w, idx, _, _ = moe.gate(x)
        _, w_hf, idx_hf = hf.gate(x)
    assert (y - y_hf).abs().max().item() <= 1e-5
    s, o = idx.sort(-1); s_hf, o_hf = idx_hf.sort(-1)
    assert torch.equal(s, s_hf)
    torch.testing.assert_close(w.gather(1, o), w_hf.gather(1, o_hf), atol=1e-6, rtol=1e-6)
    assert aux['load'].sum().item() == x.shape[0] * x.shape[1] * cfg.n_activated_experts

def test_deepseek_group_mask_is_minus_inf():
    "All kept biased scores negative: a 0.0 fill would let a masked expert win; -inf (reference, transformers 5) never does."
    cfg = ds_cfg(n_shared_experts=1)
    moe = randomize(MoE(cfg))
    with torch.no_grad(): moe.gate.bias.fill_(-2.0)
    x = torch.randn(3, 8, cfg.dim)
    _, idx, _, _ = moe.gate(x)
    hf = to_hf_deepseek(moe, cfg)
    _, _, idx_hf = hf.gate(x)
    assert torch.equal(idx.sort(-1).values, idx_hf.sort(-1).values)
    # every chosen expert lies in one of the n_limited_groups kept groups
    groups = idx // (cfg.n_routed_experts // cfg.n_expert_groups)
    assert all(len(set(r)) <= cfg.n_limited_groups for r in groups.tolist())

def test_mixtral_parity_and_aux_loss():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock, load_balancing_loss_func
    cfg = mixtral_cfg(aux_loss_alpha=0.02)
    moe = randomize(MoE(cfg), std=0.3)
    hc = MixtralConfig(hidden_size=cfg.dim, intermediate_size=cfg.moe_ffn_dim, num_local_experts=cfg.n_routed_experts,
                       num_experts_per_tok=cfg.n_activated_experts, router_jitter_noise=0.0)
    hc._experts_implementation = 'eager'
    hf = MixtralSparseMoeBlock(hc).eval()
    hf.load_state_dict({'gate.weight': moe.gate.weight.detach().clone(), 'experts.down_proj': moe.w2.detach().clone(),
                        'experts.gate_up_proj': torch.cat([moe.w1, moe.w3], dim=1).detach().clone()}, strict=True)
    x = torch.randn(3, 40, cfg.dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, aux = moe(x)
        assert (y - hf(x)).abs().max().item() <= 1e-5
        logits, _, _ = hf.gate(x)
        ref = load_balancing_loss_func((logits,), cfg.n_routed_experts, cfg.n_activated_experts)
    torch.testing.assert_close(aux['aux_loss'], 0.02 * ref, atol=1e-7, rtol=1e-5)

def test_mixtral_balanced_loss_is_alpha_k():
    "At perfect balance the Switch loss is alpha * k."
    cfg = mixtral_cfg(n_routed_experts=4, n_activated_experts=2, dim=4, aux_loss_alpha=0.1)
    gate = Gate(cfg)
    with torch.no_grad(): gate.weight.zero_()  # uniform probabilities
    x = torch.randn(10, 4)
    _, _, aux, _ = gate(x)
    # with uniform p, P_i = 1/E and sum_i f_i = k, so the loss is alpha * E * k / E whatever the tie-breaking
    torch.testing.assert_close(aux, torch.tensor(0.1 * 2))

# --- dispatch vs the dense reference --------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg', [mixtral_cfg(aux_loss_alpha=0.01), mixtral_cfg(n_shared_experts=1, dim=36, moe_ffn_dim=20),
                                 ds_cfg(aux_loss_alpha=1e-3), ds_cfg(n_shared_experts=0, dim=30, moe_ffn_dim=14)])
def test_dispatch_matches_dense_with_grads(cfg):
    moe = randomize(MoE(cfg), seed=3)
    x = torch.randn(4, 33, cfg.dim, requires_grad=True)
    y, aux = moe(x)
    ref = moe_dense(moe, x)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    params = [x] + [p for p in moe.parameters() if p.requires_grad]
    gy = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * gy).sum(), params), torch.autograd.grad((ref * gy).sum(), params)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert aux['load'].dtype == torch.long and aux['load'].shape == (cfg.n_routed_experts,)
    assert not aux['load'].requires_grad

def test_expert_receiving_no_tokens():
    "An expert with zero tokens: its slice is empty and its weights get a zero gradient."
    cfg = mixtral_cfg()
    moe = randomize(MoE(cfg))
    with torch.no_grad(): moe.gate.weight[5] = -10 * moe.gate.weight.abs().sum(0)  # expert 5 never wins for x > 0
    x = torch.rand(2, 16, cfg.dim)
    y, aux = moe(x)
    assert aux['load'][5].item() == 0
    torch.testing.assert_close(y, moe_dense(moe, x), atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert moe.w1.grad[5].abs().max().item() == 0 and moe.w1.grad.abs().sum().item() > 0

def test_seq_aux_loss_needs_sequence_shape():
    "The sequence-wise loss depends on how tokens split into sequences; (N, dim) input is one sequence."
    cfg = ds_cfg(aux_loss_alpha=0.1)
    gate = randomize(MoE(cfg)).gate
    x = torch.randn(4, 12, cfg.dim)
    a = gate(x)[2]; b = gate(x.reshape(1, 48, cfg.dim))[2]; c = gate(x.reshape(48, cfg.dim))[2]
    torch.testing.assert_close(b, c)
    assert abs(a.item() - b.item()) > 1e-6 and a.item() >= 0.1 * 0.5

def test_gather_rows_matches_indexing():
    "Dispatch (each row k times) and combine (a permutation): same values and gradients as plain `x[idx]`."
    g = torch.Generator().manual_seed(4)
    for N, k, E in [(13, 3, 5), (1, 1, 2), (40, 8, 16)]:
        indices = torch.randint(0, E, (N, k), generator=g)
        order = indices.flatten().argsort(stable=True)
        inv = torch.empty_like(order).scatter_(0, order, torch.arange(N * k))
        x = torch.randn(N, 6, generator=g, requires_grad=True)
        ys = torch.randn(N * k, 6, generator=g, requires_grad=True)
        for out, inp, ref in [(gather_rows(x, order // k, inv, k), x, x[order // k]), (gather_rows(ys, inv, order), ys, ys[inv])]:
            assert torch.equal(out, ref)
            gy = torch.randn(out.shape, generator=g)
            torch.testing.assert_close(torch.autograd.grad(out, inp, gy)[0], torch.autograd.grad(ref, inp, gy)[0], atol=1e-6, rtol=1e-6)

def test_dispatch_and_combine_have_no_scatter_add():
    "Forward and backward of the routed experts run no accumulating scatter (index_add / index_put / scatter_add)."
    from torch.utils._python_dispatch import TorchDispatchMode
    class Ops(TorchDispatchMode):
        def __init__(self): super().__init__(); self.seen = []
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append((str(func.overloadpacket), args, kwargs or {}))
            return func(*args, **(kwargs or {}))
    cfg = ds_cfg()
    moe = randomize(MoE(cfg))
    x = torch.randn(2, 24, cfg.dim, requires_grad=True)
    w, idx, _, load = moe.gate(x)
    w = w.detach().requires_grad_()
    with Ops() as ops:
        y = moe_experts(x.reshape(-1, cfg.dim), moe.w1, moe.w2, moe.w3, w, idx, load)
        y.pow(2).sum().backward()
    names = [n for n, _, _ in ops.seen]
    assert not [n for n in names if 'index_add' in n or 'scatter_add' in n or 'scatter_reduce' in n], names
    assert not [a for n, a, kw in ops.seen if 'index_put' in n and (kw.get('accumulate') or (len(a) > 3 and a[3]))]
    assert x.grad is not None and w.grad is not None and moe.w1.grad is not None

def test_moe_experts_no_tokens():
    cfg = mixtral_cfg()
    moe = randomize(MoE(cfg))
    x = torch.randn(0, cfg.dim, requires_grad=True)
    w, idx, load = torch.zeros(0, 2), torch.zeros(0, 2, dtype=torch.long), torch.zeros(cfg.n_routed_experts, dtype=torch.long)
    y = moe_experts(x, moe.w1, moe.w2, moe.w3, w, idx, load)
    assert y.shape == (0, cfg.dim)
    y.sum().backward()
    assert x.grad.shape == (0, cfg.dim) and moe.w1.grad.abs().sum().item() == 0

def test_cpu_bf16_autocast_matches_fp32_dense():
    "Under CPU bf16 autocast the experts run in bf16 (with the k-sum in fp32): close to the fp32 dense reference."
    cfg = ds_cfg(dim=64, moe_ffn_dim=32, aux_loss_alpha=1e-3)
    moe = randomize(MoE(cfg), std=0.1)
    x = torch.randn(3, 40, cfg.dim, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, _ = moe(x)
    assert y.dtype == torch.float32  # the layer returns its input's dtype
    ref = moe_dense(moe, x)
    assert (y - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    gy = torch.randn_like(ref)
    params = [x, moe.w1, moe.w2, moe.w3, moe.gate.weight]
    for a, b in zip(torch.autograd.grad((y * gy).sum(), params), torch.autograd.grad((ref * gy).sum(), params)):
        assert (a - b).norm().item() < 2e-2 * b.norm().item()

def test_no_graph_breaks():
    cfg = ds_cfg(aux_loss_alpha=1e-3)
    moe = randomize(MoE(cfg))
    torch._dynamo.reset()
    assert torch._dynamo.explain(moe)(torch.randn(2, 16, cfg.dim)).graph_break_count == 0
    torch._dynamo.reset()

# --- bias update ------------------------------------------------------------------------------------------------------

def test_update_bias_over_a_model():
    cfg = ds_cfg(bias_update_speed=0.25)
    model = torch.nn.ModuleList([MoE(cfg), torch.nn.Linear(2, 2), MoE(cfg)])
    loads = torch.stack([torch.arange(16), torch.arange(16).flip(0)])
    assert moe_update_bias(model, loads) == 2
    b0, b1 = model[0].gate.bias, model[2].gate.bias
    assert torch.equal(b0[:8], torch.full((8,), 0.25)) and torch.equal(b0[8:], torch.full((8,), -0.25))
    torch.testing.assert_close(b1, b0.flip(0))
    moe_update_bias(model, list(loads), speed=0.0)
    torch.testing.assert_close(b1, b0.flip(0))
    with pytest.raises(ValueError, match='loads'): moe_update_bias(model, loads[:1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert not any(p is b0 for g in opt.param_groups for p in g['params'])

def test_meta_build_and_counts():
    cfg = ModelConfig(dim=7168, n_routed_experts=256, n_activated_experts=8, moe_ffn_dim=2048, n_shared_experts=1, score_func='sigmoid',
                      n_expert_groups=8, n_limited_groups=4, route_scale=2.5)
    with torch.device('meta'): moe = MoE(cfg)
    assert sum(p.numel() for p in moe.parameters()) == 11_320_164_608  # spec §2: one DeepSeek-V3 MoE layer
    assert dict((n, tuple(p.shape)) for n, p in moe.named_parameters()) == {
        'gate.weight': (256, 7168), 'gate.bias': (256,), 'w1': (256, 2048, 7168), 'w2': (256, 7168, 2048), 'w3': (256, 2048, 7168),
        'shared_experts.w1.weight': (2048, 7168), 'shared_experts.w2.weight': (7168, 2048), 'shared_experts.w3.weight': (2048, 7168)}

@pytest.mark.parametrize('name', ['small', 'ds-tiny', 'deepseek-v3'])
def test_param_count_matches_config_accounting(name):
    cfg = ModelConfig.preset(name)
    with torch.device('meta'): moe = MoE(cfg)
    assert sum(p.numel() for p in moe.parameters()) == cfg.ffn_params(cfg.n_layers - 1)

@pytest.mark.parametrize('kw,field', [(dict(n_expert_groups=3), 'n_expert_groups'), (dict(n_limited_groups=5), 'n_limited_groups'),
                                      (dict(n_activated_experts=9), 'n_activated_experts'), (dict(score_func='tanh'), 'score_func'),
                                      (dict(moe_ffn_dim=0), 'moe_ffn_dim')])
def test_bad_config(kw, field):
    with pytest.raises(ValueError, match=field): MoE(ds_cfg(**kw))

# --- compile and CUDA ---------------------------------------------------------------------------------------------------

def test_compile_fullgraph_inductor():
    cfg = ds_cfg(aux_loss_alpha=1e-3, dim=32, moe_ffn_dim=16)
    moe = randomize(MoE(cfg))
    x = torch.randn(2, 16, cfg.dim, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(moe, fullgraph=True)
    yc, auxc = compiled(x)
    gy = torch.randn_like(x)
    params = [x] + [p for p in moe.parameters() if p.requires_grad]
    gc = torch.autograd.grad((yc * gy).sum() + auxc['aux_loss'], params)
    y, aux = moe(x)
    g = torch.autograd.grad((y * gy).sum() + aux['aux_loss'], params)
    torch.testing.assert_close(yc, y, atol=1e-5, rtol=1e-5)
    for a, b in zip(gc, g): torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_bf16_grouped_mm_and_compile():
    from metai.model.moe import _grouped_mm_native
    cfg = ds_cfg(dim=256, moe_ffn_dim=128, aux_loss_alpha=1e-3)
    moe = randomize(MoE(cfg), std=0.05).cuda()
    x = torch.randn(4, 256, cfg.dim, device='cuda', requires_grad=True)
    assert _grouped_mm_native(x[0].bfloat16(), moe.w1.bfloat16().mT)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        y, aux = moe(x)
    ref = moe_dense(moe, x)  # fp32
    assert (y.float() - ref).abs().max().item() < 2e-2 * ref.abs().max().item()
    gy = torch.randn_like(ref)
    params = [x, moe.w1, moe.w2, moe.w3]
    g_bf16 = torch.autograd.grad((y.float() * gy).sum(), params)
    g_ref = torch.autograd.grad((ref * gy).sum(), params)
    for a, b in zip(g_bf16, g_ref):  # per-expert group sizes are arbitrary (not multiples of 8 or 16)
        assert (a - b).norm().item() < 2e-2 * b.norm().item()
    compiled = torch.compile(moe, fullgraph=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        yc, _ = compiled(x)
    torch.testing.assert_close(yc.float(), y.float(), atol=2e-2, rtol=2e-2)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_swiglu_kernels():
    "`swiglu`'s two kernels against fp32 PyTorch rounded once, then a compiled bf16 `FFN` and `MoE` step with and without them."
    import metai.model.moe as M
    g = torch.Generator(device='cuda').manual_seed(0)
    h = (torch.randn(4096, 2 * 2048, device='cuda', generator=g) * 3).to(torch.bfloat16).requires_grad_()
    gy = torch.randn(4096, 2048, device='cuda', generator=g).to(torch.bfloat16)
    y = M.swiglu(h); y.backward(gy)
    hr = h.detach().float().requires_grad_(); a, b = hr.chunk(2, -1)
    yr = F.silu(a) * b; yr.backward(gy.float())
    same = lambda x, r: (x == r.to(torch.bfloat16)).float().mean().item()   # the share equal to fp32 rounded once
    assert same(y, yr) > 0.99 and same(h.grad, hr.grad) > 0.99, (same(y, yr), same(h.grad, hr.grad))
    for m, x in ((FFN(256, 512), torch.randn(4, 128, 256)), (randomize(MoE(ds_cfg(dim=256, moe_ffn_dim=128)), std=0.05), torch.randn(4, 128, 256))):
        m, x = m.cuda().train(), x.cuda()
        grads, prev = [], M.FUSED_SWIGLU
        for on in (False, True):
            M.FUSED_SWIGLU = on
            try:
                torch._dynamo.reset()
                with torch.autocast('cuda', dtype=torch.bfloat16): y = torch.compile(m, fullgraph=True)(x)
                y = y[0] if isinstance(y, tuple) else y
                grads.append(torch.autograd.grad(y.float().square().sum(), [p for p in m.parameters() if p.requires_grad]))   # not the router's bias
            finally: M.FUSED_SWIGLU = prev
        for a, b in zip(*grads): assert (a - b).norm().item() < 1e-2 * b.norm().item()
    torch._dynamo.reset()
