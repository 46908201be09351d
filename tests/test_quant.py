"""`metai.infer.quant`: the int4 format, the packed kernels against dequantization, whole models, checkpoints on disk,
bad input, NF4 through bitsandbytes, decoding a quantized model, and the benchmark script's CPU smoke mode."""
import copy, json, os, subprocess, sys
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_model

from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.infer.quant import (GROUP_SIZES, Int4Linear, Int4Experts, QuantMoE, dequantize_int4, load_fp_model, load_quantized,
                               pack_int4, prepare_int4, quantize_dir, quantize_int4, quantize_model, read_quant_json,
                               save_quantized, unpack_int4, is_quantized_dir)

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ds_tiny(**kw):
    c = dict(n_layers=2, n_routed_experts=8, n_expert_groups=4, n_activated_experts=2, moe_ffn_dim=64, max_seq_len=64)
    return ModelConfig.preset('ds-tiny', **{**c, **kw})

def micro(**kw): return ModelConfig.preset('micro', **{**dict(n_layers=2, max_seq_len=64), **kw})

def exact(model):
    "Every Int4Linear on its dequantize-then-matmul path (exact in fp32)."
    for m in model.modules():
        if isinstance(m, Int4Linear): m.kernel, m.kernel_device = 'dequant', torch.device('cpu')
    return model

def fake_quantized(model, qmodel):
    fake = copy.deepcopy(model)
    sd = fake.state_dict()
    with torch.no_grad():
        for name in qmodel.quant_config['linear']: sd[name + '.weight'].copy_(qmodel.get_submodule(name).dequantize())
        for name in qmodel.quant_config['experts']:
            for w in ('w1', 'w2', 'w3'): sd[f'{name}.{w}'].copy_(getattr(qmodel.get_submodule(name), w).dequantize())
    return fake

def write_ckpt(d, cfg, seed=0, tokenizer=True):
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    os.makedirs(d, exist_ok=True); cfg.to_json(d); save_model(m, os.path.join(d, 'model.safetensors'))
    if tokenizer: open(os.path.join(d, 'tokenizer.model'), 'wb').write(b'not a real tokenizer')
    return m

# --- the format ---------------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 24), groups=st.integers(1, 4), G=st.sampled_from([2, 8, 32, 64, 128]), scale=st.floats(1e-3, 10.0),
       offset=st.floats(-1.0, 1.0), seed=st.integers(0, 10_000))
def test_error_bound(n, groups, G, scale, offset, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, groups * G, generator=g) * scale + offset * scale
    q, s, z = quantize_int4(w, G)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    err = (dequantize_int4(q, s, z) - w).abs().reshape(n, groups, G)
    step = s.float().unsqueeze(-1)
    # half a step, plus bf16 rounding of the zero (relative 2^-9) and scale (15 steps x 2^-9)
    bound = 0.5 * step + z.float().abs().unsqueeze(-1) * 2**-8 + 15 * step * 2**-8 + 1e-6
    assert (err <= bound).all()

def test_min_and_max_are_representable():
    w = torch.tensor([[-1.0, -0.2, 0.6, 2.0]])  # all on the grid of step 0.2
    q, s, z = quantize_int4(w, 4, scale_dtype=torch.float32)
    assert q.tolist() == [[0, 4, 8, 15]]
    torch.testing.assert_close(dequantize_int4(q, s, z), w, atol=1e-6, rtol=0)

def test_pack_roundtrip_and_layout():
    q = torch.randint(0, 16, (2, 3, 10), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert pack_int4(torch.tensor([[0xA, 0x5]])).tolist() == [[0xA5]]  # even column in the high nibble
    with pytest.raises(ValueError, match='even'): pack_int4(torch.zeros(1, 5))

def test_bad_group_size():
    with pytest.raises(ValueError, match='divide'): quantize_int4(torch.randn(4, 100), 64)
    with pytest.raises(ValueError, match='group_size=48'): quantize_model(Transformer(micro()), group_size=48)
    with pytest.raises(ValueError, match="method='fp8'"): quantize_model(Transformer(micro()), method='fp8')

# --- kernels against dequantization --------------------------------------------------------------------------------

@pytest.mark.parametrize('K,N,G', [(128, 16, 32), (256, 48, 64), (512, 64, 128), (512, 32, 256), (2048, 256, 64)])
def test_cpu_kernel_matches_dequantized_matmul(K, N, G):
    torch.manual_seed(K + N)
    q4 = Int4Linear.from_linear(nn.Linear(K, N, bias=False), G)
    x = torch.randn(3, 5, K)
    ref = F.linear(x, q4.dequantize())
    q4.cpu_dtype = torch.float32
    assert q4.prepare() == 'cpu'
    torch.testing.assert_close(q4(x), ref, atol=1e-4, rtol=1e-4)
    q4.cpu_dtype = torch.bfloat16; q4.prepare()
    y = q4(x.bfloat16()).float()
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()

def test_fallback_shapes_and_moves():
    q4 = Int4Linear.from_linear(nn.Linear(64, 24, bias=True), 32)  # N % 16 != 0: no CPU kernel
    x = torch.randn(2, 64)
    torch.testing.assert_close(q4(x), x @ q4.dequantize().T + q4.bias, atol=1e-5, rtol=1e-5)
    assert q4.kernel == 'dequant'
    q4 = Int4Linear.from_linear(nn.Linear(64, 32), 64).to(torch.float64)  # .to(dtype) must not break the kernel path
    assert q4(torch.randn(2, 64, dtype=torch.float64)).dtype == torch.float64
    assert q4.weight.dtype == torch.float64

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('K,N,G', [(2048, 2048, 32), (2048, 512, 64), (8192, 2048, 128), (96, 64, 32), (192, 256, 256)])
def test_cuda_kernel_matches_dequantized_matmul(K, N, G):
    q4 = Int4Linear.from_linear(nn.Linear(K, N, bias=False, device='cuda', dtype=torch.bfloat16), G)
    assert q4.prepare() == 'cuda'
    x = torch.randn(5, K, device='cuda', dtype=torch.bfloat16)
    y, ref = q4(x).float(), F.linear(x, q4.dequantize(torch.bfloat16)).float()
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max()

# --- whole models ------------------------------------------------------------------------------------------------

def test_quantized_deepseek_model_equals_fake_quantized():
    torch.manual_seed(0)
    ref = Transformer(ds_tiny()).eval()
    qm = quantize_model(copy.deepcopy(ref), group_size=32)
    qc = qm.quant_config
    assert 'head' not in qc['linear'] and len(qc['experts']) == 2 and 'mtp.0.eh_proj' in qc['linear']
    assert isinstance(qm.layers[1].ffn, QuantMoE) and isinstance(qm.layers[1].ffn.w2, Int4Experts)
    assert type(qm.head) is nn.Linear and type(qm.layers[1].ffn.gate.weight) is nn.Parameter
    tokens = torch.randint(0, 8192, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exact(qm)(tokens)[0], fake_quantized(ref, qm)(tokens)[0], atol=1e-5, rtol=1e-4)

def test_quantized_sparse_attention_model(tmp_path):
    """DeepSeek-V3.2 (an indexer per layer, 4 of 12 keys kept): the indexers' projections go to 4 bits and their head
    weights stay as they are; the int4 model equals its fake-quantized twin and round-trips through quantize_dir."""
    cfg = ds_tiny(index_n_heads=4, index_head_dim=32, index_topk=4)
    torch.manual_seed(0)
    ref = Transformer(cfg).eval()
    qm = quantize_model(copy.deepcopy(ref), group_size=32)
    qc = qm.quant_config
    assert {'layers.0.attn.indexer.wq_b', 'layers.1.attn.indexer.wk', 'mtp.0.block.attn.indexer.wq_b'} <= set(qc['linear'])
    assert 'layers.0.attn.indexer.weights_proj' in qc['skipped'] and type(qm.layers[0].attn.indexer.weights_proj) is nn.Linear
    tokens = torch.randint(0, 8192, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(exact(qm)(tokens)[0], fake_quantized(ref, qm)(tokens)[0], atol=1e-5, rtol=1e-4)
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, cfg)
    quantize_dir(src, dst, group_size=32)
    with torch.no_grad(): assert torch.equal(load_quantized(dst)(tokens)[0], quantize_model(load_fp_model(src), 32)(tokens)[0])

def test_byte_report():
    qm = quantize_model(Transformer(micro()), 64)
    r = qm.quant_config['report']
    assert r['bits_per_quantized_weight'] == 4.5
    assert r['quantized_ratio_vs_bf16'] >= 3.5 and r['quantized_bytes_before'] == 4 * r['quantized_params']
    assert r['model_bytes_after'] < r['model_bytes_before']
    r128 = quantize_model(Transformer(micro()), 128).quant_config['report']
    assert r128['bits_per_quantized_weight'] == 4.25

def test_include_head_with_tied_embeddings():
    torch.manual_seed(0)
    ref = Transformer(micro()).eval()
    qm = quantize_model(copy.deepcopy(ref), 64, include_head=True)
    assert isinstance(qm.head, Int4Linear) and type(qm.embed.weight) is nn.Parameter
    tokens = torch.randint(0, 8192, (1, 10))
    with torch.no_grad(): assert (exact(copy.deepcopy(qm))(tokens)[0] - ref(tokens)[0]).abs().max() > 0

# --- checkpoints on disk ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('cfg_fn,G,head', [(micro, 64, False), (micro, 32, True), (ds_tiny, 64, False)])
def test_quantize_dir_roundtrip(tmp_path, cfg_fn, G, head):
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, cfg_fn())
    rep = quantize_dir(src, dst, group_size=G, include_head=head)
    assert sorted(os.listdir(dst)) == ['config.json', 'model.int4.safetensors', 'quant.json', 'tokenizer.model']
    assert rep['tokenizer_copied'] and rep['quantized_ratio_vs_bf16'] >= (3.5 if G >= 64 else 3.2)
    assert is_quantized_dir(dst) and not is_quantized_dir(src)
    qc = read_quant_json(dst)
    assert qc['group_size'] == G and qc['method'] == 'int4' and qc['include_head'] == head
    lm = load_quantized(dst)
    qm = quantize_model(load_fp_model(src), G, include_head=head)
    tokens = torch.randint(0, 8192, (2, 9))
    with torch.no_grad(): assert torch.equal(lm(tokens)[0], qm(tokens)[0])
    assert not lm.training

def test_generate_runs_on_a_loaded_quantized_model(tmp_path):
    from metai.infer.generate import generate
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro())
    quantize_dir(src, dst, group_size=64)
    model = load_quantized(dst)
    prompt = [2, 17, 99, 5]
    out = generate(model, prompt, max_new_tokens=6, temperature=0)
    ids = torch.tensor([prompt])
    with torch.no_grad():  # the uncached greedy reference on the same quantized model
        for _ in range(6): ids = torch.cat([ids, model(ids)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert out == ids[0, len(prompt):].tolist()
    m16 = load_quantized(dst, dtype=torch.bfloat16)  # as on a GPU: fp tensors in bf16, codes untouched
    assert m16.embed.weight.dtype == torch.bfloat16 and m16.layers[0].attn.wq.qweight.dtype == torch.uint8
    assert m16.freqs_cos.dtype == torch.float32
    assert len(generate(m16, prompt, max_new_tokens=4, temperature=0)) == 4

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_int4_generate_through_graphs(tmp_path):
    "An int4 checkpoint on CUDA, bf16, decoded through the CUDA-graph path (`gemv_int4`): its own top-2 tokens, mostly the eager decode's."
    from metai.infer.generate import generate
    from metai.infer.quant import prepare_int4
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro())
    quantize_dir(src, dst, group_size=64)
    model = load_quantized(dst, device='cuda', dtype=torch.bfloat16)
    prepare_int4(model, torch.device('cuda'))
    prompt = [2, 17, 99, 5, 41]
    eager = generate(model, prompt, max_new_tokens=24, temperature=0)  # PyTorch's int4 kernel
    graphs = generate(model, prompt, max_new_tokens=24, temperature=0, compile=True)  # `gemv_int4` (notebook 09b's INT4_IN_DECODE)
    with torch.no_grad(): top2 = model(torch.tensor([prompt + graphs], device='cuda'))[0][0, len(prompt) - 1:-1].topk(2).indices.tolist()
    assert len(graphs) == 24 and all(t in k for t, k in zip(graphs, top2)), (graphs, top2)
    assert sum(a == b for a, b in zip(graphs, eager)) >= 10, (graphs, eager)  # bf16 rounding may split a near tie later on

def test_bad_inputs(tmp_path):
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro(), tokenizer=False)
    with pytest.raises(ValueError, match='must differ'): quantize_dir(src, src)
    with pytest.raises(FileNotFoundError, match='config.json'): quantize_dir(str(tmp_path / 'nothing'), dst)
    rep = quantize_dir(src, dst)
    assert not rep['tokenizer_copied'] and 'tokenizer.model' not in os.listdir(dst)
    with pytest.raises(ValueError, match='already a quantized'): quantize_dir(dst, str(tmp_path / 'q2'))
    qpath = os.path.join(dst, 'quant.json'); good = open(qpath).read()
    for text, msg in [('{"method": ', 'not valid JSON'), ('[1, 2]', 'JSON object'),
                      (good.replace('"group_size": 64', '"group_size": 48'), "'group_size' is 48"),
                      (good.replace('"method": "int4"', '"method": "int3"'), "'method' is 'int3'"),
                      (good.replace('"layers.0.attn.wq"', '"layers.9.attn.wq"'), 'does not fit config.json')]:
        open(qpath, 'w').write(text)
        with pytest.raises(ValueError, match=msg) as e: load_quantized(dst)
        assert 'quant.json' in str(e.value) or 'config.json' in str(e.value)
    open(qpath, 'w').write(good)
    w = os.path.join(dst, 'model.int4.safetensors')
    data = open(w, 'rb').read(); open(w, 'wb').write(data[:len(data) // 2])
    with pytest.raises(ValueError, match='model.int4.safetensors'): load_quantized(dst)
    os.remove(w)
    with pytest.raises(FileNotFoundError, match='model.int4.safetensors'): load_quantized(dst)
    os.remove(os.path.join(src, 'model.safetensors'))
    with pytest.raises(FileNotFoundError, match='model.safetensors'): quantize_dir(src, str(tmp_path / 'q3'))

# --- NF4 (bitsandbytes) -------------------------------------------------------------------------------------------

def test_nf4_roundtrip(tmp_path):
    bnb = pytest.importorskip('bitsandbytes')
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'nf4')
    ref = write_ckpt(src, ds_tiny())
    rep = quantize_dir(src, dst, group_size=64, method='nf4')
    assert 'model.nf4.safetensors' in os.listdir(dst) and rep['quantized_ratio_vs_bf16'] >= 3.5
    lm = load_quantized(dst)
    assert isinstance(lm.layers[0].attn.wq_a, bnb.nn.Linear4bit)
    assert 'layers.0.attn.wkv_b' in lm.quant_config['skipped']
    tokens = torch.randint(0, 8192, (1, 10))
    with torch.no_grad():
        y, y_ref = lm(tokens)[0], ref(tokens)[0]
    assert ((y - y_ref).norm() / y_ref.norm()) < 0.5 and torch.isfinite(y).all()

# --- the benchmark script -----------------------------------------------------------------------------------------

def test_bench_script_cpu_smoke(tmp_path):
    out = str(tmp_path / 'bq.json')
    r = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'bench_quant.py'), '--device', 'cpu', '--tiny',
                        '--variants', 'bf16,int4-g64,int4-g32+head', '--out', out],
                       capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(out))
    assert res['check']['greedy_match_fp32']
    v = res['variants']
    assert set(v) == {'bf16', 'int4-g64', 'int4-g32+head'}
    for name, info in v.items():
        assert info['tokens_per_s'] > 0 and info['greedy_match_uncached'], (name, info)
    assert v['int4-g64']['kernels'] == {'cpu': 8} and v['int4-g32+head']['kernels'] == {'cpu': 9}  # per layer q/k/v, wo, w1/w3, w2 (+ head)
    assert v['int4-g64']['weight_bytes'] < v['bf16']['weight_bytes']
    r = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'bench_quant.py'), '--device', 'cpu', '--tiny',
                        '--variants', 'int4-x', '--out', out], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode != 0 and 'bad variant' in r.stderr

def test_bench_script_trained_dir(tmp_path):
    "--model-dir (a saved model instead of the random one) with a prompt from --prompt-data's validation tokens."
    import numpy as np
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    m, d = Transformer(cfg), tmp_path / 'model'
    d.mkdir(); cfg.to_json(str(d / 'config.json')); save_model(m, str(d / 'model.safetensors'))
    (tmp_path / 'data').mkdir(); (tmp_path / 'data' / 'meta.json').write_text(json.dumps(dict(format=1, dtype='uint16')))
    np.array([2] + list(range(10, 40)), dtype=np.uint16).tofile(tmp_path / 'data' / 'val.bin')
    out = str(tmp_path / 'bq.json')
    r = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'bench_quant.py'), '--device', 'cpu', '--model-dir', str(d),
                        '--prompt-data', str(tmp_path / 'data'), '--prompt-len', '16', '--new-tokens', '16', '--variants', 'bf16,int4-g64',
                        '--out', out], capture_output=True, text=True, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS='1'), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.load(open(out))
    assert res['model'] == str(d) and res['prompt'] == 'validation text' and res['config']['vocab_size'] == 300
    assert res['variants']['int4-g64']['greedy_match_uncached'] and res['variants']['int4-g64']['tokens_per_s'] > 0

# --- writing over an existing folder, interrupted writes, bad quant.json fields, nothing to quantize -------------------

def test_out_dir_holding_another_model_is_refused(tmp_path):
    src, other = str(tmp_path / 'fp'), str(tmp_path / 'other')
    write_ckpt(src, micro()); write_ckpt(other, micro(), seed=1)
    before = {n: open(os.path.join(other, n), 'rb').read() for n in os.listdir(other)}
    with pytest.raises(ValueError, match='not empty and not a quantized checkpoint; choose another --out') as e: quantize_dir(src, other)
    assert 'other' in str(e.value) and '\n' not in str(e.value)
    assert {n: open(os.path.join(other, n), 'rb').read() for n in os.listdir(other)} == before
    notes = tmp_path / 'notes'; notes.mkdir(); (notes / 'README').write_text('mine')
    with pytest.raises(ValueError, match='not empty'): quantize_dir(src, str(notes))
    q = str(tmp_path / 'q'); quantize_dir(src, q)
    (tmp_path / 'q' / 'extra.txt').write_text('a file the tool did not write')  # a quantized checkpoint plus something else
    with pytest.raises(ValueError, match='not empty'): quantize_dir(src, q)
    assert (tmp_path / 'q' / 'extra.txt').exists()
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='not a folder'): quantize_dir(src, str(tmp_path / 'file'))
    empty = tmp_path / 'empty'; empty.mkdir()
    quantize_dir(src, str(empty))  # an empty folder is fine
    assert is_quantized_dir(str(empty))

def test_requantize_replaces_without_stale_files(tmp_path):
    src, bare, dst = str(tmp_path / 'fp'), str(tmp_path / 'bare'), str(tmp_path / 'q')
    write_ckpt(src, micro()); write_ckpt(bare, micro(), seed=1, tokenizer=False)
    quantize_dir(src, dst, group_size=64)
    rep = quantize_dir(bare, dst, group_size=32)
    assert not rep['tokenizer_copied'] and sorted(os.listdir(dst)) == ['config.json', 'model.int4.safetensors', 'quant.json']
    assert read_quant_json(dst)['group_size'] == 32
    lm, qm = load_quantized(dst), quantize_model(load_fp_model(bare), 32)
    tokens = torch.randint(0, 8192, (1, 7))
    with torch.no_grad(): assert torch.equal(lm(tokens)[0], qm(tokens)[0])
    assert sorted(os.listdir(tmp_path)) == ['bare', 'fp', 'q']  # no temp or aside folder left

KILL_SCRIPT = '''
import os, sys
import metai.infer.quant as Q
def dying(model, path, metadata):  # writes half a file, then the process is killed: no cleanup runs
    open(path, 'wb').write(b'half'); os._exit(9)
Q._save_state = dying
Q.quantize_dir(sys.argv[1], sys.argv[2], group_size=32)
'''

def test_killed_quantize_leaves_the_old_checkpoint(tmp_path):
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro())
    quantize_dir(src, dst, group_size=64)
    good = {n: open(os.path.join(dst, n), 'rb').read() for n in os.listdir(dst)}
    r = subprocess.run([sys.executable, '-c', KILL_SCRIPT, src, dst], capture_output=True, text=True, cwd=REPO, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert r.returncode == 9, r.stderr
    assert {n: open(os.path.join(dst, n), 'rb').read() for n in os.listdir(dst)} == good  # the old checkpoint, whole
    left = [n for n in os.listdir(tmp_path) if n not in ('fp', 'q')]
    assert len(left) == 1 and left[0].startswith('.q.tmp')  # the killed run's temp folder, invisible to loaders
    assert read_quant_json(dst)['group_size'] == 64 and load_quantized(dst) is not None
    quantize_dir(src, dst, group_size=32)  # the next run removes it
    assert sorted(os.listdir(tmp_path)) == ['fp', 'q'] and read_quant_json(dst)['group_size'] == 32

def test_failed_save_keeps_the_old_checkpoint(tmp_path):
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro())
    quantize_dir(src, dst, group_size=64)
    good = {n: open(os.path.join(dst, n), 'rb').read() for n in os.listdir(dst)}
    with pytest.raises(FileNotFoundError):
        save_quantized(quantize_model(load_fp_model(src), 32), dst, tokenizer=str(tmp_path / 'missing.model'))
    assert {n: open(os.path.join(dst, n), 'rb').read() for n in os.listdir(dst)} == good
    assert sorted(os.listdir(tmp_path)) == ['fp', 'q']
    fresh = str(tmp_path / 'fresh')
    with pytest.raises(FileNotFoundError): save_quantized(quantize_model(load_fp_model(src), 32), fresh, tokenizer=str(tmp_path / 'missing.model'))
    assert not os.path.exists(fresh) and sorted(os.listdir(tmp_path)) == ['fp', 'q']

@pytest.mark.parametrize('old,new,msg', [
    ('"scale_dtype": "bfloat16"', '"scale_dtype": "nonsense"', "field 'scale_dtype' is 'nonsense'"),
    ('"scale_dtype": "bfloat16"', '"scale_dtype": "Tensor"', "field 'scale_dtype' is 'Tensor'"),
    ('"scale_dtype": "bfloat16"', '"scale_dtype": 3', "field 'scale_dtype' is 3"),
    ('"weights": "model.int4.safetensors"', '"weights": "../x.safetensors"', "field 'weights' is '../x.safetensors'"),
    ('"weights": "model.int4.safetensors"', '"weights": "/tmp/x.safetensors"', "field 'weights'"),
    ('"weights": "model.int4.safetensors"', '"weights": ".."', "field 'weights'")])
def test_bad_quant_json_fields(tmp_path, old, new, msg):
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro(), tokenizer=False)
    quantize_dir(src, dst)
    qpath = os.path.join(dst, 'quant.json'); text = open(qpath).read()
    assert old in text
    open(qpath, 'w').write(text.replace(old, new))
    with pytest.raises(ValueError, match=msg) as e: load_quantized(dst)
    assert 'quant.json' in str(e.value) and '\n' not in str(e.value)

def test_quant_json_without_scale_dtype_reads_as_bf16(tmp_path):
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro(), tokenizer=False)
    quantize_dir(src, dst)
    qpath = os.path.join(dst, 'quant.json'); qc = json.load(open(qpath)); del qc['scale_dtype']
    open(qpath, 'w').write(json.dumps(qc))
    assert load_quantized(dst).layers[0].attn.wq.scales.dtype == torch.bfloat16

def test_nothing_to_quantize_is_refused(tmp_path):
    cfg = ModelConfig(vocab_size=256, dim=64, n_layers=1, n_heads=8, n_kv_heads=1, ffn_dim=128, max_seq_len=64)  # inputs 64, 128
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, cfg)
    with pytest.raises(ValueError, match='group_size=256: no layer could be quantized at this group size') as e:
        quantize_dir(src, dst, group_size=256)
    assert '\n' not in str(e.value) and not os.path.exists(dst) and sorted(os.listdir(tmp_path)) == ['fp']
    with pytest.raises(ValueError, match='no layer could be quantized'): quantize_model(Transformer(cfg), 256, include_head=True)
    assert quantize_dir(src, dst, group_size=64)['n_linear'] == 7  # q k v o, w1 w2 w3
    with pytest.raises(ValueError, match='scale_dtype'): quantize_model(Transformer(cfg), 64, scale_dtype=torch.float64)

def test_byte_report_bf16_fields(tmp_path):
    src, dst = str(tmp_path / 'fp'), str(tmp_path / 'q')
    write_ckpt(src, micro())
    r = quantize_dir(src, dst, group_size=64)
    assert r['dtype_before'] == 'float32'
    assert r['quantized_bytes_before'] == 2 * r['quantized_bytes_bf16'] and r['model_bytes_before'] == 2 * r['model_bytes_bf16']
    assert r['quantized_ratio_vs_bf16'] == r['quantized_bytes_bf16'] / r['quantized_bytes_after']
    assert r['model_ratio_vs_bf16'] == r['model_bytes_bf16'] / r['model_bytes_after_rest_bf16']
    rest = r['model_bytes_before'] - r['quantized_bytes_before']  # embedding and norms, fp32
    assert r['model_bytes_after'] == rest + r['quantized_bytes_after'] and r['model_bytes_after_rest_bf16'] == rest // 2 + r['quantized_bytes_after']
    assert r['weights_file_bytes'] == os.path.getsize(os.path.join(dst, 'model.int4.safetensors'))
    assert abs(r['weights_file_bytes'] - r['model_bytes_after']) < 0.01 * r['model_bytes_after']  # plus the safetensors header
    m = Transformer(micro())  # tied head quantized: the embedding stays, in full precision
    qr = quantize_model(copy.deepcopy(m), 64, include_head=True).quant_config['report']
    emb = m.embed.weight.numel()
    assert qr['model_bytes_after'] == qr['model_bytes_before'] - qr['quantized_bytes_before'] + 4 * emb + qr['quantized_bytes_after']
    assert qr['model_bytes_after_rest_bf16'] == qr['model_bytes_bf16'] - qr['quantized_bytes_bf16'] + 2 * emb + qr['quantized_bytes_after']
