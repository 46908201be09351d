"""`metai.model.hf`: logit parity with transformers' Llama and DeepSeek-V3, exact round trips, checkpoint directories
written and read by both sides, MTP at layer 61, FP8 checkpoints, and one-line errors on bad input."""
import dataclasses, json, os, subprocess, sys
from pathlib import Path
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file, load_file

from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.model.hf import (config_to_hf, config_from_hf, key_map, to_hf, save_hf, from_hf, hf_model, hf_logits_diff,
                            permute_rope, dequant_fp8)

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4

def randomize(model, seed=0, std=0.1, bias_shift=0.0):
    "Every weight redrawn so logits are O(1): N(0, std) matrices, norm gains 1 + N(0, std), router biases N(shift, std)."
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith('gate.bias'): p.copy_(std * r + bias_shift)
            elif p.dim() == 1: p.copy_(1 + std * r)
            else: p.copy_(std * r)
    return model.eval()

def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)

BASE = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=128, max_seq_len=64)
MLA = dict(BASE, attn_type='mla', kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
           rope_interleaved=True, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, moe_ffn_dim=32,
           score_func='sigmoid', route_scale=2.5)
YARN = dict(rope_factor=4.0, original_seq_len=16)
CASES = {
    'llama-gqa': (dict(BASE, n_kv_heads=2), 0.0),
    'llama-mha': (dict(BASE), 0.0),
    'llama-mha-tied': (dict(BASE, tie_embeddings=True), 0.0),
    'llama-gqa-tied': (dict(BASE, n_kv_heads=1, tie_embeddings=True), 0.0),
    'llama-interleaved': (dict(BASE, n_kv_heads=2, rope_interleaved=True), 0.0),
    'llama-yarn': (dict(BASE, n_kv_heads=2, **YARN), 0.0),
    'llama-yarn-mscale': (dict(BASE, **YARN, mscale=0.8, mscale_all_dim=0.5), 0.0),
    'ds-no-qlora-dense-first': (dict(MLA, n_dense_layers=1), 0.0),
    'ds-qlora': (dict(MLA, q_lora_rank=32), 0.0),
    'ds-groups': (dict(MLA, q_lora_rank=32, n_expert_groups=4, n_limited_groups=2, n_dense_layers=1), 0.0),
    'ds-groups-negative-bias': (dict(MLA, n_expert_groups=4, n_limited_groups=2), -0.8),
    'ds-no-norm-topk': (dict(MLA, n_expert_groups=2, n_limited_groups=1, norm_topk_prob=False, n_shared_experts=0), 0.0),
    'ds-yarn': (dict(MLA, q_lora_rank=32, **YARN), 0.0),
    'ds-yarn-v2lite-mscale': (dict(MLA, **YARN, mscale=0.707, mscale_all_dim=0.707), 0.0),
    'ds-half-split-rope': (dict(MLA, q_lora_rank=32, rope_interleaved=False), 0.0),
    'ds-dense-mla': (dict(BASE, attn_type='mla', kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16), 0.0),
    'ds-tied-mtp2': (dict(MLA, q_lora_rank=32, tie_embeddings=True, mtp_depth=2), 0.0),
    # DeepSeek-V3.2 (DeepseekV32ForCausalLM): 16 tokens, each query keeps its 6 best keys
    'ds32-sparse': (dict(MLA, q_lora_rank=32, index_n_heads=4, index_head_dim=16, index_topk=6, n_dense_layers=1), 0.0),
    'ds32-sparse-mtp': (dict(MLA, q_lora_rank=32, index_n_heads=2, index_head_dim=8, index_topk=3, mtp_depth=1), 0.0),
}

@pytest.fixture(scope='module')
def tokens():
    return torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

# --- parity and round trips ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', list(CASES))
def test_parity_and_round_trip(name, tokens, tmp_path):
    kw, shift = CASES[name]
    cfg = ModelConfig(**kw)
    model = randomize(Transformer(cfg), seed=len(name), bias_shift=shift)
    logits = model(tokens)[0]
    assert logits.std() > 0.3                                    # O(1) logits: the tolerance is meaningful
    diff = hf_logits_diff(model, tokens)
    assert diff <= TOL, f'{name}: max abs diff {diff:.2e}'
    back = from_hf(save_hf(model, tmp_path / 'ckpt'))            # metai -> HF files -> metai
    assert back.cfg == cfg
    assert same_weights(model, back)
    assert torch.equal(back(tokens)[0], logits)
    if cfg.tie_embeddings: assert back.head.weight is back.embed.weight

def test_ds32_parity_is_sparse(tokens):
    "The V3.2 cases attend sparsely: the same weights without the indexer (dense MLA) give other logits."
    cfg = ModelConfig(**CASES['ds32-sparse'][0])
    model = randomize(Transformer(cfg), seed=3)
    dense = Transformer(dataclasses.replace(cfg, index_n_heads=0)).eval()
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if '.indexer.' not in k})
    assert (model(tokens)[0] - dense(tokens)[0]).abs().max() > 0.1
    assert hf_logits_diff(model, tokens) <= TOL
    wide = Transformer(dataclasses.replace(cfg, index_topk=16)).eval()  # top-k covers all 16 tokens: dense exactly
    wide.load_state_dict(model.state_dict())
    assert torch.equal(wide(tokens)[0], dense(tokens)[0])

def test_hf_model_sees_different_weights():
    "A check that cannot fail is no check: perturb one weight on the transformers side and parity breaks."
    model = randomize(Transformer(ModelConfig(**MLA, n_expert_groups=4, n_limited_groups=2)), seed=1)
    hf = hf_model(model)
    with torch.no_grad(): hf.model.layers[1].mlp.experts.gate_up_proj[:, :32] *= 1.5   # the w1 half of every expert
    assert hf_logits_diff(model, hf=hf) > 1e-2
    hf = hf_model(model); hf.config.rope_interleave = False
    assert hf_logits_diff(model, hf=hf) > 1e-2

def test_from_live_transformers_model_is_exact():
    model = randomize(Transformer(ModelConfig(**MLA, q_lora_rank=32, n_dense_layers=1)), seed=2)
    back = from_hf(hf_model(model))                              # fused gate_up_proj layout of transformers 5
    assert same_weights(model, back)

def test_to_hf_layouts():
    cfg = ModelConfig(**MLA, q_lora_rank=32, n_dense_layers=1, mtp_depth=1)
    model = randomize(Transformer(cfg))
    d, sd = to_hf(model)
    assert d['model_type'] == 'deepseek_v3' and d['first_k_dense_replace'] == 1 and d['num_nextn_predict_layers'] == 1
    assert d['num_key_value_heads'] == 4                         # transformers' default (128) would break a small model
    ffn = model.layers[1].ffn
    assert torch.equal(sd['model.layers.1.mlp.experts.7.gate_proj.weight'], ffn.w1[7])
    assert torch.equal(sd['model.layers.1.mlp.experts.7.down_proj.weight'], ffn.w2[7])
    assert torch.equal(sd['model.layers.1.mlp.gate.e_score_correction_bias'], ffn.gate.bias)
    for k in ('enorm', 'hnorm', 'eh_proj', 'shared_head.norm', 'embed_tokens', 'shared_head.head'):
        assert f'model.layers.2.{k}.weight' in sd
    assert 'model.layers.2.mlp.experts.0.up_proj.weight' in sd  # the MTP block is a MoE block
    _, fused = to_hf(model, fused_experts=True)
    assert torch.equal(fused['model.layers.1.mlp.experts.gate_up_proj'], torch.cat([ffn.w1, ffn.w3], 1))
    assert torch.equal(fused['model.layers.1.mlp.experts.down_proj'], ffn.w2)
    names = sorted(m for m, _ in key_map(cfg))
    assert names == sorted(model.state_dict())

def test_permute_rope_matches_rotation():
    from metai.model.rope import rope_tables, apply_rope
    H, hd, d, T = 3, 8, 12, 7
    g = torch.Generator().manual_seed(0)
    wq, wk, x = torch.randn(H * hd, d, generator=g) / 4, torch.randn(H * hd, d, generator=g) / 4, torch.randn(1, T, d, generator=g)
    cos, sin = rope_tables(hd, T)
    def scores(wq, wk, inter):
        q = apply_rope((x @ wq.T).view(1, T, H, hd), cos, sin, inter)
        k = apply_rope((x @ wk.T).view(1, T, H, hd), cos, sin, inter)
        return torch.einsum('bthd,bshd->bhts', q, k)
    torch.testing.assert_close(scores(wq, wk, True), scores(permute_rope(wq, H), permute_rope(wk, H), False))
    assert not torch.allclose(scores(wq, wk, True), scores(wq, wk, False))
    assert torch.equal(permute_rope(permute_rope(wq, H), H, inverse=True), wq)

# --- checkpoints written by transformers, read by transformers -----------------------------------------------------

@pytest.mark.parametrize('shard', [5 * 2**30, 150_000])
def test_transformers_reads_save_hf(shard, tokens, tmp_path):
    from transformers import AutoModelForCausalLM
    model = randomize(Transformer(ModelConfig(**MLA, q_lora_rank=32, n_expert_groups=4, n_limited_groups=2, n_dense_layers=1)), seed=3)
    path = save_hf(model, tmp_path / 'out', max_shard_bytes=shard)
    files = sorted(os.listdir(path))
    assert ('model.safetensors.index.json' in files) == (shard < 2**20)
    assert not any(f.startswith('.') for f in files)             # no temporary files left behind
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager').eval()
    assert hf_logits_diff(model, tokens, hf=theirs) <= TOL

def test_resave_removes_stale_shards(tmp_path):
    model = randomize(Transformer(ModelConfig(**BASE)))
    save_hf(model, tmp_path, max_shard_bytes=50_000)
    assert (tmp_path / 'model.safetensors.index.json').exists()
    save_hf(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['config.json', 'model.safetensors']
    assert same_weights(model, from_hf(tmp_path))

@pytest.mark.parametrize('family', ['llama-tied', 'llama-yarn', 'llama-yarn-mscale', 'deepseek'])
def test_from_hf_reads_save_pretrained(family, tokens, tmp_path):
    "Checkpoints transformers wrote itself (no metai block in config.json) load and compute the same logits."
    from transformers import LlamaConfig, DeepseekV3Config, AutoModelForCausalLM
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, initializer_range=0.1)
    yarn = dict(rope_type='yarn', rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16)
    if family == 'llama-tied': hc = LlamaConfig(**common, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=5e5)
    elif family == 'llama-yarn': hc = LlamaConfig(**common, num_key_value_heads=2, rope_parameters=yarn)
    elif family == 'llama-yarn-mscale': hc = LlamaConfig(**common, rope_parameters=dict(yarn, mscale=0.9, mscale_all_dim=0.6))
    else: hc = DeepseekV3Config(**common, num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2,
                                num_experts_per_tok=3, n_group=4, topk_group=2, first_k_dense_replace=1, kv_lora_rank=32,
                                q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_nextn_predict_layers=0,
                                rope_parameters=dict(yarn, mscale=1.0, mscale_all_dim=1.0))
    theirs = AutoModelForCausalLM.from_config(hc, attn_implementation='eager').eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if 'norm' in n: p.add_(0.1 * torch.randn_like(p))
        if family == 'deepseek':
            for l in theirs.model.layers[1:]: l.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.cfg.tie_embeddings == (family == 'llama-tied')
    assert ours(tokens)[0].std() > 0.3
    assert hf_logits_diff(ours, tokens, hf=theirs) <= TOL
    assert hf_logits_diff(ours, tokens, hf=AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation='eager').eval()) <= TOL

def test_mtp_at_layer_61_matches_transformers_drafter(tokens, tmp_path):
    "DeepSeek-V3's depth at toy width: our model.layers.61.* load into transformers' MTP drafter and draft the same logits."
    from transformers import AutoModelForCausalLM
    from transformers.modeling_layers import MtpModel
    cfg = ModelConfig.preset('ds-tiny', vocab_size=256, dim=32, n_layers=61, n_dense_layers=3, n_heads=2, q_lora_rank=16,
                             kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, ffn_dim=64,
                             n_routed_experts=4, n_activated_experts=2, moe_ffn_dim=16, n_expert_groups=2, n_limited_groups=1,
                             mtp_depth=1, max_seq_len=64)
    model = randomize(Transformer(cfg), seed=4)
    path = save_hf(model, tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(path, attn_implementation='eager').eval()
    drafter = MtpModel.from_pretrained(theirs).eval()
    T = tokens.shape[1]
    with torch.no_grad():
        logits, _, aux = model(tokens, use_mtp=True)
        out = theirs(input_ids=tokens, output_hidden_states=True)
        h = drafter.forward_layer(0, out.hidden_states[-1][:, :T-1], torch.arange(T - 1)[None], None, input_ids=tokens[:, 1:])
        draft = drafter._project_to_logits(h)
    assert (out.logits - logits).abs().max() <= TOL
    assert (draft - aux['mtp_logits'][0]).abs().max() <= TOL
    back = from_hf(path)
    assert back.cfg.mtp_depth == 1 and same_weights(model, back)
    assert from_hf(theirs).cfg.mtp_depth == 0                    # transformers drops layer 61: metai reads what exists

# --- configs ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('preset', ['micro', 'gpt2', 'llama3-8b', 'ds-tiny', 'deepseek-v3', 'deepseek-v3.2'])
def test_config_round_trip(preset):
    cfg = ModelConfig.preset(preset)
    d = json.loads(json.dumps(config_to_hf(cfg)))
    assert config_from_hf(d) == cfg
    # transformers 4 style (rope_theta + rope_scaling) and transformers 5 style (rope_parameters) read the same
    v4 = {k: v for k, v in d.items() if k not in ('rope_parameters', 'metai')}
    v5 = {k: v for k, v in d.items() if k not in ('rope_theta', 'rope_scaling', 'metai')}
    assert config_from_hf(v4) == config_from_hf(v5)

def test_transformers_accepts_config():
    from transformers import AutoConfig
    for preset in ('micro', 'ds-tiny'):
        d = config_to_hf(ModelConfig.preset(preset, rope_factor=4.0, original_seq_len=128))
        hc = AutoConfig.for_model(d.pop('model_type'), **d)
        assert hc.rope_parameters['rope_type'] == 'yarn' and hc.rope_parameters['factor'] == 4.0

def test_hub_deepseek_v3_config():
    hub = dict(architectures=['DeepseekV3ForCausalLM'], model_type='deepseek_v3', vocab_size=129280, hidden_size=7168,
               intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
               num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
               kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
               topk_method='noaux_tc', n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
               norm_topk_prob=True, scoring_func='sigmoid', aux_loss_alpha=0.001, seq_aux=True, hidden_act='silu',
               max_position_embeddings=163840, initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
               rope_theta=10000, rope_scaling=dict(beta_fast=32, beta_slow=1, factor=40, mscale=1.0, mscale_all_dim=1.0,
                                                   original_max_position_embeddings=4096, type='yarn'),
               num_nextn_predict_layers=1, torch_dtype='bfloat16',
               quantization_config=dict(activation_scheme='dynamic', fmt='e4m3', quant_method='fp8', weight_block_size=[128, 128]))
    cfg = config_from_hf(hub)
    ref = ModelConfig.preset('deepseek-v3')
    skip = {'aux_loss_alpha', 'init_std', 'bias_update_speed', 'mtp_loss_weight'}
    for f in dataclasses.fields(cfg):
        if f.name not in skip: assert getattr(cfg, f.name) == getattr(ref, f.name), f.name
    with torch.device('meta'): assert Transformer(cfg).num_params() == 671_026_419_200

def test_hub_deepseek_v32_config():
    "DeepSeek-V3.2's hub config: V3's plus the three index keys; transformers' DeepseekV32Config builds the same shapes."
    from transformers import AutoConfig
    hub = config_to_hf(ModelConfig.preset('deepseek-v3'))
    hub.update(architectures=['DeepseekV32ForCausalLM'], model_type='deepseek_v32', index_n_heads=64, index_head_dim=128,
               index_topk=2048)
    cfg = config_from_hf(hub)
    assert cfg == ModelConfig.preset('deepseek-v3.2')
    assert config_to_hf(cfg)['architectures'] == ['DeepseekV32ForCausalLM']
    hc = AutoConfig.for_model(**{k: v for k, v in config_to_hf(cfg).items() if k not in ('metai', 'torch_dtype', 'dtype')})
    assert (type(hc).__name__, hc.index_n_heads, hc.index_head_dim, hc.index_topk) == ('DeepseekV32Config', 64, 128, 2048)
    with torch.device('meta'): assert Transformer(cfg).num_params() == 671_026_419_200 + 61 * 13_959_424

# --- FP8 -----------------------------------------------------------------------------------------------------------

def test_fp8_checkpoint_is_dequantized(tmp_path):
    model = randomize(Transformer(ModelConfig(**MLA, q_lora_rank=32)), seed=5)
    save_hf(model, tmp_path)
    sd = load_file(tmp_path / 'model.safetensors')
    k = 'model.layers.0.self_attn.q_b_proj.weight'                # (64, 32): one 128x128 block ...
    w = sd[k]
    scale = w.abs().amax().reshape(1, 1) / 448                    # ... with one scale, as DeepSeek's FP8 weights
    sd[k] = (w / scale).to(torch.float8_e4m3fn)
    sd[k + '_scale_inv'] = scale
    save_file(sd, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
    back = from_hf(tmp_path, dtype=torch.float32)
    got = back.layers[0].attn.wq_b.weight
    assert not torch.equal(got, w) and (got - w).abs().max() <= 0.07 * w.abs().max()
    assert torch.equal(got, dequant_fp8(sd[k], scale).float())  # bf16, as DeepSeek's fp8_cast_bf16.py writes

# --- bad input -----------------------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / 'ckpt'
    save_hf(randomize(Transformer(ModelConfig(**MLA, q_lora_rank=32))), path)
    return path

def _edit_config(path, **changes):
    d = json.loads((path / 'config.json').read_text())
    d.update(changes)
    (path / 'config.json').write_text(json.dumps(d))

def test_error_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a checkpoint directory'): from_hf(tmp_path / 'nope')

def test_error_missing_config(ckpt):
    (ckpt / 'config.json').unlink()
    with pytest.raises(FileNotFoundError, match=r'config\.json: missing'): from_hf(ckpt)

def test_error_invalid_json(ckpt):
    (ckpt / 'config.json').write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r'config\.json: not valid JSON'): from_hf(ckpt)
    (ckpt / 'config.json').write_bytes(b'\xff\xfe{}')
    with pytest.raises(ValueError, match=r'config\.json: not valid JSON'): from_hf(ckpt)
    (ckpt / 'config.json').write_text('[1, 2]')
    with pytest.raises(ValueError, match=r'config\.json: expected a JSON object, got list'): from_hf(ckpt)

@pytest.mark.parametrize('changes,pattern', [
    (dict(model_type='mistral'), "unsupported model_type 'mistral'"),
    (dict(model_type=None), 'unsupported model_type None'),
    (dict(scoring_func='softmax'), "scoring_func 'softmax'"),
    (dict(hidden_act='gelu'), "hidden_act 'gelu'"),
    (dict(attention_bias=True), 'attention_bias=true'),
    (dict(rope_scaling=dict(type='llama3', factor=8.0), rope_parameters=None), "rope_scaling type 'llama3'"),
    (dict(rope_scaling=dict(type='yarn', factor=4.0)), 'original_max_position_embeddings is missing'),
    (dict(kv_lora_rank=None), "missing field 'kv_lora_rank'|kv_lora_rank"),
    (dict(n_group=3), 'n_expert_groups'),
])
def test_error_bad_config(ckpt, changes, pattern):
    _edit_config(ckpt, **changes)
    with pytest.raises(ValueError, match=pattern) as e: from_hf(ckpt)
    assert 'config.json' in str(e.value) and '\n' not in str(e.value)

def test_error_missing_field(ckpt):
    d = json.loads((ckpt / 'config.json').read_text()); del d['hidden_size']
    (ckpt / 'config.json').write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config\.json: missing field 'hidden_size'"): from_hf(ckpt)

def test_error_no_weights(ckpt):
    (ckpt / 'model.safetensors').unlink()
    (ckpt / 'pytorch_model.bin').write_bytes(b'not loaded')
    with pytest.raises(FileNotFoundError, match=r'no \*\.safetensors weights \(pickled \.bin/\.pt checkpoints are not loaded\)'):
        from_hf(ckpt)

def test_error_corrupt_safetensors(ckpt):
    (ckpt / 'model.safetensors').write_bytes(b'garbage' * 10)
    with pytest.raises(ValueError, match=r'model\.safetensors: not a readable safetensors file'): from_hf(ckpt)

def test_error_shape_mismatch_names_key(ckpt):
    _edit_config(ckpt, q_lora_rank=16)
    with pytest.raises(ValueError, match=r'config\.json: tensor model\.layers\.0\.self_attn\.q_a_proj\.weight has shape \(32, 64\) in the '
                                         r'checkpoint, the config calls for \(16, 64\) \(layers\.0\.attn\.wq_a\.weight\)'):
        from_hf(ckpt)

def test_error_missing_tensor_names_key(ckpt):
    sd = load_file(ckpt / 'model.safetensors'); del sd['model.layers.1.mlp.gate.weight']
    save_file(sd, ckpt / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match=r'model\.layers\.1\.mlp\.gate\.weight: missing from the checkpoint \(config\.json calls for it\)'):
        from_hf(ckpt)

def test_error_unexpected_tensor(ckpt):
    sd = load_file(ckpt / 'model.safetensors'); sd['model.layers.0.self_attn.q_a_proj.bias'] = torch.zeros(32)
    save_file(sd, ckpt / 'model.safetensors', metadata={'format': 'pt'})
    with pytest.raises(ValueError, match=r'q_a_proj\.bias has no metai counterpart'): from_hf(ckpt)
    assert from_hf(ckpt, strict=False).cfg.q_lora_rank == 32

def test_error_index_lists_missing_file(tmp_path):
    model = randomize(Transformer(ModelConfig(**BASE)))
    save_hf(model, tmp_path, max_shard_bytes=50_000)
    shard = sorted(json.loads((tmp_path / 'model.safetensors.index.json').read_text())['weight_map'].values())[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=rf'{shard}: listed in .*index\.json but missing'): from_hf(tmp_path)
    (tmp_path / 'model.safetensors.index.json').write_text('{"weights": {}}')
    with pytest.raises(ValueError, match=r'index\.json: malformed index \(no weight_map object\)'): from_hf(tmp_path)

@pytest.mark.parametrize('kw,field', [
    (dict(BASE, n_routed_experts=8, n_activated_experts=2, moe_ffn_dim=32), 'n_routed_experts'),
    (dict(MLA, score_func='softmax'), 'score_func'),
    (dict(BASE, mtp_depth=1), 'mtp_depth'),
    (dict(MLA, q_lora_rank=32, index_n_heads=2, index_head_dim=8, rope_interleaved=False), 'rope_interleaved'),
])
def test_error_no_transformers_counterpart(kw, field):
    with pytest.raises(ValueError, match=field): config_to_hf(ModelConfig(**kw))

# --- transformers stays optional ------------------------------------------------------------------------------------

def test_works_without_transformers(tmp_path):
    code = f'''
import sys, torch
sys.modules['transformers'] = None                               # any import of transformers now fails
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.model.hf import save_hf, from_hf, hf_model
m = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, ffn_dim=48, max_seq_len=32))
back = from_hf(save_hf(m, {str(tmp_path)!r}))
assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), back.state_dict().values()))
try: hf_model(m)
except ImportError: print('ok')
'''
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0 and r.stdout.strip() == 'ok', r.stdout + r.stderr
