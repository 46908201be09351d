"Tests for metai.config: presets, exact accounting (cross-checked against transformers models on the meta device), validation, config.json."
import json, math, os, dataclasses
import pytest, torch
from hypothesis import given, settings, assume, strategies as st, HealthCheck
from metai.config import ModelConfig, ConfigError, PRESETS, DTYPE_BITS, SHAPE_FIELDS, presets_table

# ---------------------------------------------------------------- exact numbers (spec §2, §3, §6, §9)

def test_deepseek_v3_numbers():
    c = ModelConfig.preset('deepseek-v3')
    assert c.attn_params() == 187_107_328
    assert c.ffn_params(3) == 11_320_164_608 and c.ffn_params(3, active=True) == 398_196_992
    assert c.num_params() == 671_026_419_200
    assert c.active_params() == 37_552_297_472
    assert c.active_params(embedding=False) == 37_552_297_472 - 129280*7168
    assert c.mtp_params() == 11_610_068_224
    assert c.mtp_params(active=True) == 688_100_608
    assert c.hub_params() == 684_489_845_504
    assert c.kv_elems_per_token() == 576 and c.kv_elems_per_token(naive_mla=True) == 128*(192+128) == 40_960
    assert c.kv_elems_per_token(per_layer=False) == 576*61
    assert c.kv_cache_bytes(per_layer=True) == 1152 and c.kv_cache_bytes() == 70_272
    assert abs(c.kv_cache_bytes(128*1024)/2**30 - 8.58) < 0.005

def test_deepseek_v32_and_llama_numbers():
    v3, v32 = ModelConfig.preset('deepseek-v3'), ModelConfig.preset('deepseek-v3.2')
    assert v32.indexer_params() == 13_959_424 and v3.indexer_params() == 0
    assert v32.num_params() == v3.num_params() + 61*13_959_424
    assert v32.kv_elems_per_token() == 576 + 128
    assert (v32.index_n_heads, v32.index_head_dim, v32.index_topk) == (64, 128, 2048)
    assert dataclasses.replace(v32, index_n_heads=0) == v3           # V3.2 = V3 + the three index keys
    l3 = ModelConfig.preset('llama3-8b')
    assert l3.num_params() == l3.active_params() == l3.hub_params() == 8_030_261_248
    assert l3.kv_cache_bytes() == 128*1024                           # 128 KiB per token in bf16

def test_preset_fields():
    v3 = ModelConfig.preset('deepseek-v3')
    assert (v3.rope_factor, v3.original_seq_len, v3.beta_fast, v3.beta_slow, v3.mscale, v3.mscale_all_dim) == (40, 4096, 32, 1, 1, 1)
    assert (v3.max_seq_len, v3.mtp_depth, v3.aux_loss_alpha, v3.bias_update_speed, v3.mtp_loss_weight, v3.init_std) == (163840, 1, 1e-4, 1e-3, 0.3, 0.006)
    assert v3.rope_interleaved and v3.score_func == 'sigmoid' and v3.route_scale == 2.5 and not v3.tie_embeddings
    m = ModelConfig.preset('micro')
    assert m.attn_type == 'gqa' and 1 < m.kv_heads < m.n_heads and m.tie_embeddings and m.vocab_size == 8192 and not m.is_moe
    assert 6e6 <= m.num_params() <= 10e6 and m.max_seq_len == 256
    s = ModelConfig.preset('small')
    assert (s.n_routed_experts, s.n_activated_experts, s.score_func, s.aux_loss_alpha, s.max_seq_len, s.vocab_size) == (8, 2, 'softmax', 0.01, 2048, 32000)
    assert abs(s.num_params() - 125e6) < 2e6 and s.active_params() < s.num_params() / 2
    g = ModelConfig.preset('gpt2')
    assert (g.dim, g.n_layers, g.n_heads, g.vocab_size, g.max_seq_len, g.tie_embeddings) == (768, 12, 6, 50304, 1024, True)  # 6 heads of 128 (GPT-2: 12 of 64)
    assert abs(g.num_params() - 124e6) < 1e6
    l3 = ModelConfig.preset('llama3-8b')
    assert (l3.rope_theta, l3.max_seq_len, l3.norm_eps, l3.tie_embeddings, l3.rope_interleaved) == (500000, 8192, 1e-5, False, False)
    t = ModelConfig.preset('ds-tiny')
    assert t.attn_type == 'mla' and t.q_lora_rank > 0 and t.rope_interleaved and t.score_func == 'sigmoid'
    assert t.n_expert_groups > t.n_limited_groups > 1 and t.n_shared_experts == 1 and t.n_dense_layers == 1
    assert (t.route_scale, t.bias_update_speed, t.aux_loss_alpha, t.mtp_depth, t.vocab_size) == (2.5, 1e-3, 1e-4, 1, 8192)
    assert 2e6 < t.num_params() < 10e6

# ---------------------------------------------------------------- independent counts: transformers models on the meta device

def hf_model(c: ModelConfig, n_layers=None):
    "The transformers model with the same architecture as `c` (no MTP), built without memory."
    import transformers as tf
    L = n_layers or c.n_layers
    if c.attn_type == 'mla':
        kw = dict(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, moe_intermediate_size=c.moe_ffn_dim,
                  num_hidden_layers=L, num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads,
                  n_shared_experts=c.n_shared_experts, n_routed_experts=c.n_routed_experts, num_experts_per_tok=c.n_activated_experts,
                  n_group=c.n_expert_groups, topk_group=c.n_limited_groups, first_k_dense_replace=c.n_dense_layers,
                  q_lora_rank=c.q_lora_rank or None, kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                  qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, tie_word_embeddings=c.tie_embeddings)
        if c.index_n_heads:
            cls, cfg = tf.DeepseekV32ForCausalLM, tf.DeepseekV32Config(**kw, index_n_heads=c.index_n_heads, index_head_dim=c.index_head_dim, index_topk=c.index_topk)
        else: cls, cfg = tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(**kw)
    elif c.is_moe:
        cls, cfg = tf.MixtralForCausalLM, tf.MixtralConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.moe_ffn_dim,
            num_hidden_layers=L, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, head_dim=c.hd,
            num_local_experts=c.n_routed_experts, num_experts_per_tok=c.n_activated_experts, tie_word_embeddings=c.tie_embeddings)
    else:
        cls, cfg = tf.LlamaForCausalLM, tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
            num_hidden_layers=L, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads, head_dim=c.hd,
            tie_word_embeddings=c.tie_embeddings, attention_bias=False, mlp_bias=False)
    with torch.device('meta'): return cls(cfg)

def hf_counts(m, c):
    "(total, activated) of a transformers model; the sigmoid router's bias is a buffer there, a parameter here."
    total = sum(p.numel() for p in m.parameters()) + sum(b.numel() for n, b in m.named_buffers() if n.endswith('e_score_correction_bias'))
    experts = sum(p.numel() for n, p in m.named_parameters() if '.mlp.experts.' in n)   # fused [E, ...] tensors
    skipped = experts * (c.n_routed_experts - c.n_activated_experts) // c.n_routed_experts if c.is_moe else 0
    return total, total - skipped

@pytest.mark.parametrize('name', list(PRESETS))
def test_presets_match_transformers(name):
    c = ModelConfig.preset(name)
    total, active = hf_counts(hf_model(c), c)
    assert c.num_params() == total
    assert c.active_params() == active

@pytest.mark.parametrize('name', ['ds-tiny', 'deepseek-v3'])
def test_mtp_layer_matches_a_transformers_layer(name):
    c = ModelConfig.preset(name)
    m = hf_model(c, n_layers=c.n_layers + 1)   # the extra layer has the MTP layer's kind
    layer = sum(p.numel() for p in m.model.layers[c.n_layers].parameters()) + c.n_routed_experts   # + router bias buffer
    assert c.mtp_params() == c.mtp_depth * (layer + 3*c.dim + 2*c.dim*c.dim)

gqa_cfgs = st.builds(lambda H, g, hd, d_mult, L, ffn, V, tied, explicit: ModelConfig(
        vocab_size=V, dim=64*d_mult if not explicit else 48*d_mult, n_layers=L, n_heads=H*g, n_kv_heads=H,
        head_dim=hd if explicit else 0, ffn_dim=ffn, tie_embeddings=tied),
    st.integers(1, 4), st.sampled_from([1, 2, 4]), st.sampled_from([8, 16, 32]), st.integers(1, 4), st.integers(1, 3),
    st.integers(1, 300), st.integers(10, 1000), st.booleans(), st.booleans())

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gqa_cfgs)
def test_random_gqa_configs_match_llama(c):
    assume(not (not c.head_dim and c.dim % c.n_heads or c.hd % 2))   # skip invalid draws; validation is tested below
    c.validate()
    assert c.num_params() == hf_counts(hf_model(c), c)[0]

mla_cfgs = st.builds(lambda H, r_q, r_kv, dn, dr, dv, E_per, groups, keep, k, shared, dense, L: ModelConfig(
        vocab_size=97, dim=32, n_layers=L, n_heads=H, attn_type='mla', q_lora_rank=r_q, kv_lora_rank=r_kv,
        qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv, ffn_dim=40,
        n_routed_experts=E_per*groups, n_expert_groups=groups, n_limited_groups=min(keep, groups),
        n_activated_experts=min(k, E_per*min(keep, groups)), n_shared_experts=shared, moe_ffn_dim=24,
        n_dense_layers=min(dense, L), score_func='sigmoid', mtp_depth=1),
    st.integers(1, 4), st.sampled_from([0, 16, 24]), st.sampled_from([8, 16]), st.sampled_from([4, 8]), st.sampled_from([2, 4]),
    st.sampled_from([4, 8]), st.integers(2, 4), st.integers(1, 4), st.integers(1, 3), st.integers(1, 4), st.integers(0, 2),
    st.integers(0, 2), st.integers(1, 3))

@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mla_cfgs)
def test_random_deepseek_configs_match_transformers(c):
    c.validate()
    total, active = hf_counts(hf_model(c), c)
    assert (c.num_params(), c.active_params()) == (total, active)
    c2 = ModelConfig.from_dict(c.to_dict()); assert c2 == c

# ---------------------------------------------------------------- FLOPs, weights, KV

def test_flops():
    g = ModelConfig.preset('gpt2')
    assert g.flops_per_token(1024, training=True) == 6*g.num_params() + 12*12*12*64*1024   # nanoGPT estimate_mfu
    assert g.flops_per_token() == g.flops_per_token(g.max_seq_len) == 2*g.num_params() + 4*12*12*64*1024
    v3, v32 = ModelConfig.preset('deepseek-v3'), ModelConfig.preset('deepseek-v3.2')
    fwd = v3.flops_per_token(4096)
    assert fwd == 2*(37_552_297_472 - 129280*7168) + 61*2*128*320*4096
    assert ModelConfig.preset('deepseek-v3', mtp_depth=0).flops_per_token(4096, training=True) == 3*fwd
    assert v3.flops_per_token(4096, training=True) == 3*fwd + 3*(2*(688_100_608 + 129280*7168) + 2*128*320*4096)
    # DSA: core attention over min(T, 2048) keys + indexer scores over all T
    for T in (1024, 131072):
        diff = v32.flops_per_token(T) - v3.flops_per_token(T)
        assert diff == 2*61*13_959_424 + 61*(2*128*320*(min(T, 2048) - T) + 2*64*128*T)
    t = ModelConfig.preset('micro')
    assert t.flops_per_token(1) < t.flops_per_token(256) < t.flops_per_token(256, training=True)

def test_weight_and_kv_bytes():
    l3 = ModelConfig.preset('llama3-8b'); n = 8_030_261_248
    assert [l3.weight_bytes(d) for d in ('fp32', 'bf16', 'fp16', 'fp8', 'int4')] == [4*n, 2*n, 2*n, n, n//2]
    v3 = ModelConfig.preset('deepseek-v3')
    assert v3.weight_bytes('fp8') == 671_026_419_200 and v3.weight_bytes('fp8', mtp=True) == 682_636_487_424
    assert ModelConfig(vocab_size=9, dim=1, n_layers=1, n_heads=1, head_dim=2, ffn_dim=1, tie_embeddings=True).weight_bytes('int4') == \
        math.ceil(ModelConfig(vocab_size=9, dim=1, n_layers=1, n_heads=1, head_dim=2, ffn_dim=1, tie_embeddings=True).num_params() / 2)
    for bad in ('fp4', 'float32', ''):
        with pytest.raises(ValueError, match='dtype'): v3.weight_bytes(bad)
        with pytest.raises(ValueError, match='dtype'): v3.kv_cache_bytes(1, bad)
    assert v3.kv_cache_bytes(10, 'fp32', per_layer=True) == 576*4*10
    assert v3.kv_cache_bytes(1, naive_mla=True) == 40_960*2*61
    m = ModelConfig.preset('micro')
    assert m.kv_elems_per_token() == 2*2*64 and m.kv_cache_bytes(256) == 2*2*64*2*6*256
    assert set(DTYPE_BITS) == {'fp32', 'bf16', 'fp16', 'fp8', 'int4'}

def test_presets_table():
    t = presets_table()
    lines = t.splitlines()
    assert len(lines) == 2 + len(PRESETS) and len({len(l) for l in lines}) == 1   # aligned
    assert '671.03B' in t and '37.55B' in t and '684.49B' in t and '8.58 GiB' in t and '8.03B' in t
    assert len(presets_table(['micro']).splitlines()) == 3
    with pytest.raises(ValueError, match='unknown preset'): presets_table(['nope'])

# ---------------------------------------------------------------- presets API

def test_preset_api():
    with pytest.raises(ValueError) as e: ModelConfig.preset('gpt5')
    for n in PRESETS: assert n in str(e.value)
    c = ModelConfig.preset('ds-tiny', n_layers=3, index_n_heads=2, index_head_dim=32, index_topk=16)
    assert (c.n_layers, c.index_n_heads, c.index_topk) == (3, 2, 16) and c.num_params() > ModelConfig.preset('ds-tiny', n_layers=3).num_params()
    c.dim = 1; assert PRESETS['ds-tiny'].dim == 256                                      # a copy, not the preset
    assert ModelConfig.preset('micro') is not ModelConfig.preset('micro')
    with pytest.raises(ValueError, match='n_layer: not a ModelConfig field.*n_layers'): ModelConfig.preset('micro', n_layer=2)
    with pytest.raises(ValueError, match='n_activated_experts=0'): ModelConfig.preset('small', n_activated_experts=0)
    for n in PRESETS: assert ModelConfig.preset(n).validate() == PRESETS[n]

# ---------------------------------------------------------------- validation: every rule

MLA = ModelConfig.preset('ds-tiny')
SOFTMOE = dict(n_routed_experts=8, n_activated_experts=2, moe_ffn_dim=64)
REJECT = [  # (base, overrides, regex the message must match: the field and its value come first)
    (None, dict(vocab_size=0), r'^vocab_size=0: must be positive'),
    (None, dict(dim=-8), r'^dim=-8'), (None, dict(n_layers=0), r'^n_layers=0'), (None, dict(n_heads=0), r'^n_heads=0'),
    (None, dict(max_seq_len=0), r'^max_seq_len=0'), (None, dict(original_seq_len=0), r'^original_seq_len=0'),
    (None, dict(rope_theta=0.0), r'^rope_theta=0.0'), (None, dict(norm_eps=0.0), r'^norm_eps'), (None, dict(init_std=-0.1), r'^init_std'),
    (None, dict(route_scale=0.0), r'^route_scale'),
    *[(None, {f: -1}, rf'^{f}=-1: must not be negative') for f in
      ('n_kv_heads', 'head_dim', 'q_lora_rank', 'kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim', 'ffn_dim',
       'n_routed_experts', 'n_shared_experts', 'n_activated_experts', 'moe_ffn_dim', 'n_dense_layers', 'mtp_depth',
       'index_n_heads', 'aux_loss_alpha', 'bias_update_speed', 'mtp_loss_weight', 'mscale', 'mscale_all_dim')],
    # types
    (None, dict(dim='256'), r"^dim='256': expected int, got str"), (None, dict(n_layers=2.0), r'^n_layers=2.0: expected int'),
    (None, dict(n_heads=True), r'^n_heads=True: expected int'), (None, dict(tie_embeddings=1), r'^tie_embeddings=1: expected bool'),
    (None, dict(rope_theta=float('nan')), r'^rope_theta=nan: expected a finite float'), (None, dict(norm_eps='1e-5'), r'^norm_eps'),
    (None, dict(attn_type=None), r'^attn_type=None: expected str'),
    # GQA
    (None, dict(attn_type='mqa'), r"^attn_type='mqa': must be one of gqa, mla"),
    (None, dict(n_heads=3), r'^n_heads=3: must divide dim=256'),
    (None, dict(n_heads=4, n_kv_heads=3), r'^n_kv_heads=3: must divide n_heads=4'),
    (None, dict(n_heads=4, n_kv_heads=8), r'^n_kv_heads=8'),
    (None, dict(head_dim=33), r'^head_dim=33: head size 33 is odd'),
    (None, dict(dim=260), r'^head_dim=0: head size 65 is odd'),
    # MLA
    *[(MLA, {f: 0}, rf"^{f}=0: attn_type='mla' needs it positive") for f in ('kv_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim')],
    (ModelConfig(), dict(attn_type='mla'), r'^kv_lora_rank=0'),
    (MLA, dict(qk_rope_head_dim=15), r'^qk_rope_head_dim=15: is odd'),
    (MLA, dict(n_kv_heads=2), r'^n_kv_heads=2'),
    # FFN / MoE
    (None, dict(score_func='relu'), r"^score_func='relu': must be one of softmax, sigmoid"),
    (None, dict(n_dense_layers=5), r'^n_dense_layers=5: is more than n_layers=4'),
    (None, dict(ffn_dim=0), r'^ffn_dim=0: dense layers need'),
    (None, dict(**SOFTMOE, n_dense_layers=1, ffn_dim=0), r'^ffn_dim=0'),
    (None, dict(n_expert_groups=0), r'^n_expert_groups=0'),
    (None, dict(n_limited_groups=0), r'^n_limited_groups=0'),
    (None, dict(**SOFTMOE, n_expert_groups=2, n_limited_groups=3), r'^n_limited_groups=3: must be in 1..n_expert_groups=2'),
    (None, dict(SOFTMOE, n_activated_experts=0), r'^n_activated_experts=0: top-k must be in 1..n_routed_experts=8'),
    (None, dict(SOFTMOE, n_activated_experts=9), r'^n_activated_experts=9: top-k must be in'),
    (None, dict(SOFTMOE, moe_ffn_dim=0), r'^moe_ffn_dim=0'),
    (None, dict(**SOFTMOE, n_expert_groups=3), r'^n_expert_groups=3: must divide n_routed_experts=8'),
    (MLA, dict(n_activated_experts=9), r'^n_activated_experts=9: top-k exceeds the 2 kept groups x 4 experts per group'),
    (MLA, dict(n_expert_groups=16, n_activated_experts=2), r'^n_expert_groups=16: a group score sums the top-2'),
    (None, dict(n_activated_experts=2), r'^n_activated_experts=2: needs n_routed_experts > 0'),
    (None, dict(n_shared_experts=1), r'^n_shared_experts=1: needs n_routed_experts > 0'),
    # DSA indexer
    (None, dict(index_n_heads=4), r"^attn_type='gqa': the DSA indexer"),
    (MLA, dict(index_n_heads=4, q_lora_rank=0), r'^q_lora_rank=0: the DSA indexer reads the query latent'),
    (MLA, dict(index_n_heads=4, index_head_dim=0), r'^index_head_dim=0'),
    (MLA, dict(index_n_heads=4, index_head_dim=31), r'^index_head_dim=31: must be positive and even'),
    (MLA, dict(index_n_heads=4, index_head_dim=8), r'^index_head_dim=8: must hold the RoPE part qk_rope_head_dim=16'),
    (MLA, dict(index_n_heads=4, index_topk=0), r'^index_topk=0: must be positive when the indexer is on'),
    # YaRN
    (None, dict(rope_factor=0.5), r'^rope_factor=0.5'),
    (None, dict(beta_slow=40.0), r'^beta_slow=40.0: needs 0 < beta_slow < beta_fast=32.0'),
    (None, dict(beta_slow=0.0), r'^beta_slow=0.0'),
]

@pytest.mark.parametrize('base,overrides,regex', REJECT, ids=[f'{k}={v!r}' for _, o, _ in REJECT for k, v in list(o.items())[-1:]])
def test_validate_rejects(base, overrides, regex):
    c = dataclasses.replace(base or ModelConfig(), **overrides)
    with pytest.raises(ConfigError, match=regex) as e: c.validate()
    assert isinstance(e.value, ValueError)
    assert e.value.field in str(e.value)

def test_validate_accepts_edge_cases():
    ModelConfig(n_heads=3, head_dim=64).validate()                        # explicit head_dim lifts divisibility
    ModelConfig(n_kv_heads=1).validate()                                  # MQA
    ModelConfig(**SOFTMOE, ffn_dim=0).validate()                          # all-MoE model needs no dense width
    ModelConfig(**SOFTMOE, n_dense_layers=4).validate()                   # n_dense_layers == n_layers is allowed
    dataclasses.replace(MLA, q_lora_rank=0).validate()                    # V2-Lite style full-rank query
    dataclasses.replace(MLA, index_n_heads=2, index_head_dim=16, index_topk=8).validate()
    assert ModelConfig().validate() == ModelConfig()                       # returns self
    ModelConfig(rope_theta=10000).validate()                              # an int is a fine float

# ---------------------------------------------------------------- config.json

@pytest.mark.parametrize('name', list(PRESETS))
def test_json_round_trip(tmp_path, name):
    c = ModelConfig.preset(name)
    p = c.to_json(tmp_path/'cfg.json')
    assert p == str(tmp_path/'cfg.json') and ModelConfig.from_json(p) == c
    assert ModelConfig.from_dict(c.to_dict()) == c and ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert json.load(open(p)) == c.to_dict()
    assert c.to_json(tmp_path) == str(tmp_path/'config.json') and ModelConfig.from_json(tmp_path) == c
    assert [f for f in os.listdir(tmp_path) if f.startswith('.')] == []   # no temp files

def test_json_nested_dir_and_defaults(tmp_path):
    p = ModelConfig.preset('micro').to_json(tmp_path/'a'/'b'/'config.json')
    assert os.path.exists(p)
    (tmp_path/'min.json').write_text('{"dim": 128, "rope_theta": 10000}')         # shape fields left out: refused
    with pytest.raises(ValueError, match=rf"^{tmp_path}/min.json: missing fields 'vocab_size', 'n_layers'"): ModelConfig.from_json(tmp_path/'min.json')
    d = {f: getattr(ModelConfig(dim=128), f) for f in SHAPE_FIELDS}               # only the shape fields: the rest default
    (tmp_path/'min.json').write_text(json.dumps({**d, 'rope_theta': 10000}))
    c = ModelConfig.from_json(tmp_path/'min.json')
    assert c.dim == 128 and type(c.rope_theta) is float and c == ModelConfig(dim=128)

def write_cfg(tmp_path, d, name='config.json'):
    p = tmp_path/name; p.write_text(json.dumps(d, indent=2)); return p

def test_json_unknown_key(tmp_path):
    d = ModelConfig.preset('micro').to_dict(); d['n_layer'] = 3
    p = write_cfg(tmp_path, d)
    line = next(i for i, l in enumerate(p.read_text().splitlines(), 1) if '"n_layer"' in l)
    with pytest.raises(ValueError, match=rf"^{p}:{line}: unknown key 'n_layer' \(did you mean 'n_layers'\?\)$"): ModelConfig.from_json(p)
    with pytest.raises(ConfigError, match="unknown key 'zzz'"): ModelConfig.from_dict({'zzz': 1})

def test_json_bad_values_name_file_line_field(tmp_path):
    p = write_cfg(tmp_path, {**ModelConfig.preset('micro').to_dict(), 'dim': 64, 'n_heads': 5})
    with pytest.raises(ValueError, match=rf'^{p}:5: n_heads=5: must divide dim=64'): ModelConfig.from_json(p)
    p = write_cfg(tmp_path, {'dim': '64'})
    with pytest.raises(ValueError, match=rf"^{p}:2: dim='64': expected int"): ModelConfig.from_json(p)
    p = write_cfg(tmp_path, {'dim': 64.0})
    with pytest.raises(ValueError, match=rf'^{p}:2: dim=64.0: expected int'): ModelConfig.from_json(p)

def test_json_malformed(tmp_path):
    p = tmp_path/'config.json'
    p.write_text('{\n  "dim": 64,\n  "n_heads": 4\n  "n_layers": 2\n}')
    with pytest.raises(ValueError, match=rf'^{p}:4: bad JSON'): ModelConfig.from_json(p)
    p.write_text('{"dim": 64,}')
    with pytest.raises(ValueError, match=rf'^{p}:1: bad JSON'): ModelConfig.from_json(p)
    p.write_text('')
    with pytest.raises(ValueError, match=rf'^{p}: empty file'): ModelConfig.from_json(p)
    p.write_text('  \n')
    with pytest.raises(ValueError, match='empty file'): ModelConfig.from_json(p)
    p.write_bytes(b'{"dim": "\xff\xfe"}')
    with pytest.raises(ValueError, match=rf'^{p}: not valid UTF-8'): ModelConfig.from_json(p)
    p.write_text('[1, 2]')
    with pytest.raises(ValueError, match=rf'^{p}:1: expected a JSON object'): ModelConfig.from_json(p)
    with pytest.raises(FileNotFoundError, match='missing.json'): ModelConfig.from_json(tmp_path/'missing.json')
    with pytest.raises(ValueError, match='expected a dict'): ModelConfig.from_dict([('dim', 3)])

def test_to_json_is_atomic(tmp_path, monkeypatch):
    p = ModelConfig.preset('micro').to_json(tmp_path/'config.json'); before = open(p).read()
    with pytest.raises(ValueError, match='n_kv_heads=3'): ModelConfig(n_kv_heads=3).to_json(p)     # invalid: nothing written
    assert open(p).read() == before
    def boom(*a, **k): raise OSError('disk full')
    monkeypatch.setattr(os, 'replace', boom)                                 # crash at the rename
    with pytest.raises(OSError, match='disk full'): ModelConfig.preset('gpt2').to_json(p)
    assert open(p).read() == before and os.listdir(tmp_path) == ['config.json']
