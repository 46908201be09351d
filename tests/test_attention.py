"Parity of metai.model.rope / metai.model.attention with transformers' Llama and DeepSeek-V3 attention (fp32, CPU)."
import math
import pytest
import torch
from metai.config import ModelConfig
from metai.model.rope import rope_inv_freq, rope_tables, precompute_freqs, yarn_softmax_scale, apply_rope
from metai.model.attention import Attention, MLA, RMSNorm

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3Attention, DeepseekV3RotaryEmbedding,
                                                                   DeepseekV3RMSNorm)

TOL = 1e-5


@pytest.fixture(autouse=True)
def _no_grad():
    torch.manual_seed(0)
    with torch.no_grad(): yield


def hf_causal(T): return torch.full((T, T), float('-inf')).triu(1)[None, None]


def hf_rope(rope_type, theta, factor=None, orig=None, mscale=None, mscale_all_dim=None):
    if rope_type == 'default': return dict(rope_type='default', rope_theta=theta)
    d = dict(rope_type='yarn', rope_theta=theta, factor=factor, original_max_position_embeddings=orig)
    if mscale is not None: d.update(mscale=mscale, mscale_all_dim=mscale_all_dim)
    return d


@pytest.mark.parametrize("dim,theta,factor,orig,bf,bs", [
    (64, 1e4, 40., 4096, 32., 1.), (32, 5e5, 4., 256, 16., 2.), (16, 1e4, 8., 64, 32., 1.), (128, 1e6, 2., 8192, 32., 1.),
    (64, 1e4, 1.5, 16, 32., 1.)])
def test_yarn_inv_freq_matches_transformers(dim, theta, factor, orig, bf, bs):
    hc = DeepseekV3Config(qk_rope_head_dim=dim, max_position_embeddings=int(orig * factor), rope_parameters=dict(
        rope_type='yarn', rope_theta=theta, factor=factor, original_max_position_embeddings=orig, beta_fast=bf,
        beta_slow=bs, mscale=1., mscale_all_dim=1.))
    inv_freq, att = ROPE_INIT_FUNCTIONS['yarn'](hc)
    assert torch.equal(rope_inv_freq(dim, theta, factor, orig, bf, bs), inv_freq)
    assert att == 1.0


def test_deepseek_v3_softmax_scale():
    cfg = ModelConfig(attn_type='mla', qk_nope_head_dim=128, qk_rope_head_dim=64, rope_factor=40., original_seq_len=4096)
    assert abs(yarn_softmax_scale(cfg) - 0.135234) < 1e-6


LLAMA = {  # n_heads, n_kv_heads, head_dim, theta, yarn (factor, orig) or None
    'mha': (8, 8, 16, 1e4, None), 'gqa': (8, 2, 16, 5e5, None), 'mqa': (8, 1, 16, 1e4, None),
    'gqa-wide-head': (4, 2, 32, 1e4, None), 'gqa-yarn': (8, 4, 16, 1e4, (4., 8))}


@pytest.mark.parametrize("name", list(LLAMA))
def test_llama_attention_parity(name):
    H, KV, hd, theta, yarn = LLAMA[name]
    T, dim = 13, 64
    # generic YaRN (no mscale keys in HF) is metai's mscale_all_dim=0: the temperature rides on cos/sin
    cfg = ModelConfig(dim=dim, n_heads=H, n_kv_heads=KV, head_dim=hd, rope_theta=theta, max_seq_len=T,
                      rope_factor=yarn[0] if yarn else 1., original_seq_len=yarn[1] if yarn else 4096, mscale_all_dim=0.)
    hc = LlamaConfig(hidden_size=dim, num_attention_heads=H, num_key_value_heads=KV, head_dim=hd,
                     max_position_embeddings=T, attention_bias=False,
                     rope_parameters=hf_rope('yarn' if yarn else 'default', theta, *(yarn or ())))
    hc._attn_implementation = 'eager'
    ours, theirs = Attention(cfg), LlamaAttention(hc, 0)
    for p in ours.parameters(): p.normal_(0, 0.2)
    theirs.load_state_dict({f'{a}_proj.weight': getattr(ours, f'w{a}').weight for a in 'qkvo'})
    x = torch.randn(2, T, dim)
    cos, sin = LlamaRotaryEmbedding(hc)(x, torch.arange(T)[None])
    ref = theirs(x, position_embeddings=(cos, sin), attention_mask=hf_causal(T))[0]
    out = ours(x, *precompute_freqs(cfg))
    assert out.shape == ref.shape == (2, T, dim)
    assert (out - ref).abs().max().item() <= TOL


DS = {  # q_lora_rank, rope interleaved, yarn
    'qlora-interleaved': (24, True, False), 'qlora-interleaved-yarn': (24, True, True),
    'noqlora-interleaved': (0, True, False), 'noqlora-interleaved-yarn': (0, True, True),
    'qlora-halfsplit': (24, False, False), 'noqlora-halfsplit-yarn': (0, False, True)}


@pytest.mark.parametrize("name", list(DS))
@pytest.mark.parametrize("mode", ['naive', 'absorbed'])
def test_deepseek_v3_attention_parity(name, mode):
    q_lora, inter, yarn = DS[name]
    T, dim, H = 11, 64, 4
    cfg = ModelConfig(dim=dim, n_heads=H, attn_type='mla', q_lora_rank=q_lora, kv_lora_rank=32, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=12, rope_interleaved=inter, max_seq_len=16,
                      rope_factor=4. if yarn else 1., original_seq_len=4, mscale=1., mscale_all_dim=1.)
    hc = DeepseekV3Config(hidden_size=dim, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora or None,
                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, rope_interleave=inter,
                          max_position_embeddings=16, rms_norm_eps=cfg.norm_eps,
                          rope_parameters=hf_rope('yarn', 1e4, 4., 4, 1., 1.) if yarn else hf_rope('default', 1e4))
    hc._attn_implementation = 'eager'
    ours, theirs = MLA(cfg, mode=mode), DeepseekV3Attention(hc, 0)
    for p in ours.parameters(): p.normal_(0, 0.2)
    names = dict(wq='q_proj', wq_a='q_a_proj', q_norm='q_a_layernorm', wq_b='q_b_proj', wkv_a='kv_a_proj_with_mqa',
                 kv_norm='kv_a_layernorm', wkv_b='kv_b_proj', wo='o_proj')
    theirs.load_state_dict({names[k.split('.')[0]] + '.weight': w for k, w in ours.state_dict().items()})
    assert math.isclose(ours.softmax_scale, theirs.scaling, rel_tol=1e-12)
    x = torch.randn(2, T, dim)
    cos, sin = DeepseekV3RotaryEmbedding(hc)(x, torch.arange(T)[None])
    ref = theirs(x, position_embeddings=(cos, sin), attention_mask=hf_causal(T))[0]
    out = ours(x, *precompute_freqs(cfg))
    assert out.shape == ref.shape == (2, T, dim)
    assert (out - ref).abs().max().item() <= TOL


def test_rmsnorm_matches_transformers_bf16():
    ours, theirs = RMSNorm(40), DeepseekV3RMSNorm(40)
    ours.weight.normal_(); theirs.weight.copy_(ours.weight)
    x = (torch.randn(3, 7, 40) * 5).bfloat16()
    assert torch.equal(ours(x), theirs(x))


def test_rope_table_too_short():
    cos, sin = rope_tables(8, 4)
    with pytest.raises(ValueError, match='RoPE table has 4 rows'):
        apply_rope(torch.randn(1, 2, 1, 8), cos, sin, start_pos=3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_rope_qkv():
    "`rope_qkv_backward` against fp32 autograd rounded once, on SDPA's own gradients; a compiled bf16 layer with and without it."
    import metai.model.attention as A
    from metai.model.rope import apply_rope
    B, T, H, KV, D = 4, 1024, 6, 2, 128
    cfg = ModelConfig(dim=768, n_heads=H, n_kv_heads=KV, head_dim=D, max_seq_len=T)
    cos, sin = [t.cuda() for t in precompute_freqs(cfg)]
    g = torch.Generator(device='cuda').manual_seed(0)
    with torch.enable_grad():
        qkv = torch.randn(B, T, (H + 2 * KV) * D, device='cuda', generator=g).to(torch.bfloat16).requires_grad_()
        q, k, v = A.rope_qkv(qkv, cos, sin, H, KV, D)
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True)
        dq, dk, dv = torch.autograd.grad(y, (q, k, v), torch.randn(y.shape, device='cuda', generator=g).to(y.dtype), retain_graph=True)
        (dqkv,) = torch.autograd.grad((q, k, v), qkv, (dq, dk, dv))
        ref = qkv.detach().float().requires_grad_()
        q0, k0, v0 = ref.split([H * D, KV * D, KV * D], -1)
        outs = (apply_rope(q0.view(B, T, H, D), cos, sin), apply_rope(k0.view(B, T, KV, D), cos, sin), v0.view(B, T, KV, D))
        (dref,) = torch.autograd.grad(outs, ref, (dq.float(), dk.float(), dv.float()))
    same = (dqkv == dref.to(torch.bfloat16)).float().mean().item()   # the share equal to fp32 rounded once
    assert same > 0.99, same
    m, x = A.Attention(cfg).cuda(), torch.randn(2, 256, 768, device='cuda')
    grads, prev = [], A.FUSED_QKV_ROPE
    for on in (False, True):
        A.FUSED_QKV_ROPE = on
        try:
            torch._dynamo.reset()
            with torch.enable_grad(), torch.autocast('cuda', dtype=torch.bfloat16):
                y = torch.compile(m, fullgraph=True)(x, cos, sin)
                grads.append(torch.autograd.grad(y.float().square().sum(), list(m.parameters())))
        finally: A.FUSED_QKV_ROPE = prev
    for a, b in zip(*grads): assert (a - b).norm().item() < 1e-2 * b.norm().item()
    torch._dynamo.reset()
