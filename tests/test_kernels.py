"The batch-1 decode kernels (notebook 09b): under Triton's interpreter on CPU, and on CUDA against their references."
import pytest
import copy
import torch
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.infer.cache import make_cache, forward_step
from metai.infer.kernels import gemv, gemv_int4, gemv_ref, decode_forward, check_kernels_interpreted, triton
from metai.infer.quant import quantize_int4, pack_int4, dequantize_int4

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')

@pytest.mark.skipif(triton is None, reason='Triton is not installed')
def test_kernels_interpreted():
    """The kernels: every prologue/epilogue, 1 and 3 weights, a row count no tile divides, GQA/MHA attention: close to the
    references; `gemv_few` equal, row for row, to the one-row `gemv`."""
    bf16, int4, attention, few = map(float, check_kernels_interpreted().split()[1::2])
    assert bf16 <= 0.07 and int4 <= 0.07 and attention <= 0.07 and few == 0, (bf16, int4, attention, few)

def llama(**kw):
    d = dict(vocab_size=1024, dim=256, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=704, max_seq_len=128, init_std=0.05)
    return ModelConfig(**{**d, **kw})

def test_gemv_rows_bad_arguments():
    "Mixed-up switches of `gemv_rows` get a one-line error instead of a silently wrong product."
    from metai.infer.kernels import gemv_rows
    x, ws = torch.randn(2, 16), [torch.randn(8, 16), torch.randn(8, 16)]
    with pytest.raises(ValueError, match='glu takes no residual and no silu'): gemv_rows(x, ws, glu=True, residual=torch.randn(2, 8))
    with pytest.raises(ValueError, match='glu takes no residual and no silu'): gemv_rows(x, ws, glu=True, silu=True)
    with pytest.raises(ValueError, match='pass norm=None'): gemv_rows(x, ws, norm=torch.ones(16), rms=True)
    with pytest.raises(ValueError, match='two weights of one shape'): gemv_rows(x, ws + ws[:1], glu=True)
    assert gemv_rows(x, ws, glu=True).shape == (2, 8)

@pytest.mark.cuda
@cuda
@pytest.mark.parametrize('product_tiles', [False, True])
def test_cuda_gemv_matches_reference(product_tiles, monkeypatch):
    "The tuned kernels at the 1B shapes (three weights with a norm, SwiGLU + residual, the head): fp32-reference close."
    import metai.infer.kernels as kernels
    monkeypatch.setattr(kernels, 'PRODUCT_TILES', product_tiles)
    torch.manual_seed(0)
    bf = dict(device='cuda', dtype=torch.bfloat16)
    for K, Ns, kw in [(2048, (2048, 512, 512), 'norm'), (8192, (2048,), 'silu'), (2048, (128256,), 'norm'), (768, (768,), 'res'),
                      (2048, (8192, 8192), 'norm'), (2048, (2048,), 'res'), (2048, (32001,), 'norm')]:  # w1/w3, wo; a head whose rows no tile divides
        ws = [torch.randn(n, K, **bf) / K ** 0.5 for n in Ns]
        x = torch.randn(2 * K if kw == 'silu' else K, **bf)
        a = dict(norm=torch.rand(K, **bf) + 0.5) if kw == 'norm' else dict(residual=torch.randn(sum(Ns), **bf)) if kw == 'res' else {}
        y = gemv(x, ws, silu=kw == 'silu', **a).float()
        ref = gemv_ref(x, ws, silu=kw == 'silu', **a).float()
        assert (y - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-2, (K, Ns, kw, (y - ref).abs().max().item())
        q, s, z = zip(*[quantize_int4(w, 64) for w in ws])
        y4 = gemv_int4(x, [pack_int4(t) for t in q], list(s), list(z), 64, silu=kw == 'silu', **a).float()
        ref4 = gemv_ref(x, [dequantize_int4(*t, dtype=torch.bfloat16) for t in zip(q, s, z)], silu=kw == 'silu', **a).float()
        assert (y4 - ref4).abs().max() <= 0.02 * ref4.abs().max() + 1e-2, (K, Ns, kw, (y4 - ref4).abs().max().item())

def assert_steps_match(m, fast, T=1, n=40):
    "`fast` (decode_forward / verify_forward) against `forward_step` on its own cache, T tokens at a time over n positions."
    c1, c2 = make_cache(m, 1, 64, mtp=False), make_cache(m, 1, 64, mtp=False)
    toks = torch.randint(0, 1024, (1, n), device='cuda')
    with torch.no_grad():
        for t0 in range(0, n, T):
            pos = torch.arange(t0, t0 + T, device='cuda')
            a, b = forward_step(m, toks[:, t0:t0 + T], pos, c1).float(), fast(m, toks[:, t0:t0 + T], pos, c2).float()
            assert (a - b).abs().max() <= 0.05 * a.abs().max(), (t0, (a - b).abs().max().item(), a.abs().max().item())
    return toks

@pytest.mark.cuda
@cuda
@pytest.mark.parametrize('merge', [False, True])
def test_cuda_fused_decode_matches(merge, monkeypatch):
    "`decode_forward` with the kernels against `forward_step` at every position (bf16), and generate's greedy tokens (CUDA graphs)."
    from metai.infer.generate import generate, clear_graphs
    import metai.infer.kernels as K
    monkeypatch.setattr(K, 'ATTN_MERGE', merge); clear_graphs()   # graphs recorded with the other attention are not reused
    torch.manual_seed(0)
    m = Transformer(llama()).eval().cuda().to(torch.bfloat16); m.init_freqs()
    toks = assert_steps_match(m, decode_forward)
    with torch.no_grad():
        prompt = toks[0, :10].tolist()
        fused = generate(m, prompt, 40, temperature=0, compile=True)
        plain = generate(m, prompt, 40, temperature=0, compile=True, kernels=False)
        top2 = m(torch.tensor([prompt + fused], device='cuda'))[0][0, len(prompt) - 1:-1].topk(2).indices.tolist()
    assert len(fused) == 40 and all(t in k for t, k in zip(fused, top2)), (fused, top2)
    assert sum(a == b for a, b in zip(fused, plain)) >= 10, (fused, plain)  # bf16 rounding may split a near tie later on

@pytest.mark.cuda
@cuda
def test_cuda_int4_fused_decode_matches():
    "`decode_forward` on an int4 model (products in `gemv_int4`) against `forward_step` (PyTorch's int4 kernel) at every position."
    from metai.infer.quant import quantize_model, prepare_int4
    import metai.infer.kernels as K
    assert K.INT4_IN_DECODE
    torch.manual_seed(0)
    m = Transformer(llama()).eval().cuda().to(torch.bfloat16); m.init_freqs()
    quantize_model(m, group_size=64, include_head=True); prepare_int4(m, torch.device('cuda'))
    assert_steps_match(m, decode_forward)

@pytest.mark.cuda
@cuda
@pytest.mark.parametrize('few,pk', [(0, False), (0, True), (4, False)])
def test_cuda_gemv_rows_and_verify_forward(few, pk, monkeypatch):
    """`gemv_rows` at the 1B shapes for 1-4, 5 and 9 rows against the reference, with f(x) in its own Triton kernel
    (`pk`, `PROLOGUE_KERNEL`) or not, and with up to `few` rows through `gemv_few` (each row then within bf16 rounding of
    `gemv` of that row); `verify_forward` against `forward_step` (bf16)."""
    import metai.infer.kernels as K_
    from metai.infer.kernels import gemv_rows, verify_forward
    monkeypatch.setattr(K_, 'FEW_ROWS', few)
    monkeypatch.setattr(K_, 'PROLOGUE_KERNEL', pk)
    torch.manual_seed(0)
    bf = dict(device='cuda', dtype=torch.bfloat16)
    for K, Ns, kw in [(2048, (2048, 512, 512), 'norm'), (8192, (2048,), 'silu'), (2048, (2048,), 'res'), (2048, (128256,), 'norm')]:
        ws = [torch.randn(n, K, **bf) / K ** 0.5 for n in Ns]
        for M in (1, 2, 3, 4, 5, 9):
            x = torch.randn(M, 2 * K if kw == 'silu' else K, **bf)
            a = dict(norm=torch.rand(K, **bf) + 0.5) if kw == 'norm' else dict(residual=torch.randn(M, sum(Ns), **bf)) if kw == 'res' else {}
            y, ref = gemv_rows(x, ws, silu=kw == 'silu', **a).float(), gemv_ref(x, ws, silu=kw == 'silu', **a).float()
            assert (y - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-2, (K, Ns, kw, M, (y - ref).abs().max().item())
            if M <= few:  # each row as the one-row kernel gives it, up to the order of the last sum (bit for bit under the interpreter)
                rows = torch.stack([gemv(x[i], ws, silu=kw == 'silu', **{k: v[i] if k == 'residual' else v for k, v in a.items()})
                                    for i in range(M)]).float()
                assert (y - rows).abs().max() <= rows.abs().max() / 128, (K, Ns, kw, M, (y - rows).abs().max().item())
    if pk:  # the prologue kernel alone: as the modules compute f(x), up to bf16 rounding
        from metai.infer.kernels import rows_prologue, prologue
        x, g = torch.randn(5, 2 * 8192, **bf), torch.rand(2048, **bf) + 0.5
        for a, ref in ((rows_prologue(x[:, :2048].contiguous(), g), prologue(x[:, :2048], g)), (rows_prologue(x, silu=True), prologue(x, silu=True))):
            assert (a.float() - ref.float()).abs().max() <= ref.float().abs().max() / 128
    m = Transformer(llama()).eval().cuda().to(torch.bfloat16); m.init_freqs()
    for T in ((2, 5) if few or pk else (5,)): assert_steps_match(m, verify_forward, T=T)
    if few or pk: return
    from metai.infer.kernels import fold_norm_gains            # the norm inside the rows kernel: its gain folded into the weights
    ws, ones = [torch.randn(n, 2048, **bf) / 2048 ** 0.5 for n in (2048, 512, 512)], torch.ones(2048, **bf)
    for M in (1, 2, 5, 9):
        x, r = torch.randn(M, 2048, **bf) * 3, torch.randn(M, 3072, **bf)
        y, ref = gemv_rows(x, ws, rms=True, residual=r).float(), gemv_ref(x, ws, norm=ones, residual=r).float()
        assert (y - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-2, (M, (y - ref).abs().max().item())
    for mod in m.modules():
        if type(mod).__name__ == 'RMSNorm': mod.weight.data.uniform_(0.5, 1.5)
    f = fold_norm_gains(copy.deepcopy(m))
    assert_steps_match(m, lambda _, *a: verify_forward(f, *a), T=5)   # folded verification against the model's own steps
    from metai.infer.kernels import prologue                    # SwiGLU's silu(a) * b in the w1/w3 product's epilogue
    w13 = [torch.randn(8192, 2048, **bf) / 2048 ** 0.5 for _ in range(2)]
    for M in (1, 2, 5, 9):
        x = torch.randn(M, 2048, **bf)
        for kw, rk in ((dict(), dict()), (dict(rms=True), dict(norm=ones))):
            y, ref = gemv_rows(x, w13, glu=True, **kw).float(), prologue(gemv_ref(x, w13, **rk), silu=True).float()
            assert (y - ref).abs().max() <= 0.02 * ref.abs().max() + 1e-2, (M, kw, (y - ref).abs().max().item())
    monkeypatch.setattr(K_, 'GLU_ROWS', True)
    assert_steps_match(m, verify_forward, T=5)
    assert_steps_match(m, lambda _, *a: verify_forward(f, *a), T=5)

@pytest.mark.cuda
@cuda
@pytest.mark.parametrize('merge', [False, True])
def test_cuda_decode_attention_long(merge, monkeypatch):
    """The split attention (one token, and 2-16 causal tokens) against its reference on long caches: empty splits, one
    position, block edges, the last slot; with `merge`, one token's splits merged by the last of them (the counters back at 0)."""
    from metai.infer.kernels import decode_attention, decode_attention_ref
    import metai.infer.kernels as K
    monkeypatch.setattr(K, 'ATTN_MERGE', merge)
    torch.manual_seed(0)
    bf = dict(device='cuda', dtype=torch.bfloat16)
    for H, KV, D, inter in ((32, 8, 64, True), (12, 12, 64, False), (6, 2, 128, True), (16, 2, 64, False)):  # groups of 4, 1, 3, 8
        S = 4096
        cos, sin = torch.randn(S, D // 2, device='cuda'), torch.randn(S, D // 2, device='cuda')
        caches = [torch.randn(1, S, KV, D, **bf) for _ in range(2)]
        c2 = [c.clone() for c in caches]
        for pos in (0, 1, 31, 32, 33, 511, 1000, 4080, 4091, 4095):
            for T in (1, 2, 5, 16, -1):  # one token (its own kernel; qkv (n,)), T causal tokens (the rows kernel; qkv (T, n)), -1: one as (1, n)
                if pos + abs(T) > S: continue
                qkv = torch.randn(abs(T), (H + 2 * KV) * D, **bf)
                qkv, T = (qkv[0] if T == 1 else qkv), abs(T)
                p = torch.arange(pos, pos + T, device='cuda')
                a = decode_attention(qkv, *caches, p, cos, sin, H, KV, inter, D ** -0.5).float()
                b = decode_attention_ref(qkv, *c2, p, cos, sin, H, KV, inter, D ** -0.5).float()
                assert a.shape == b.shape == qkv.shape[:-1] + (H * D,)
                assert (a - b).abs().max() <= 0.01 * b.abs().max() + 0.01, (H, KV, D, pos, T, (a - b).abs().max().item())
                assert all((x.float() - y.float()).abs().max() <= 0.02 * y.float().abs().max() for x, y in zip(caches, c2)), (H, KV, D, pos, T)
                if merge: assert K._COUNTERS[torch.device('cuda', torch.cuda.current_device())].abs().sum() == 0

@pytest.mark.cuda
@cuda
def test_cuda_topk_sample():
    """`topk_sample` on the GPU at the 1B vocabulary: exactly the reference's token with the same exponential draws; seeded draws
    kept, repeatable and distributed as `logits_to_probs`; and `generate` through it reproduces itself under a seed."""
    from metai.infer.kernels import topk_sample, topk_sample_ref
    from metai.infer.generate import logits_to_probs, generate
    import metai.infer.kernels as K
    g = torch.Generator(device='cuda').manual_seed(0)
    l = (torch.randn(4, 128256, device='cuda', generator=g) * 3).to(torch.bfloat16)
    l[0, :5] = l[0].float().topk(200).values[-1].to(torch.bfloat16)               # ties at the 200th value
    e = torch.empty(4, 128256, device='cuda').exponential_(generator=g)
    seed = torch.randint(0, 2**31 - 1, (4,), device='cuda', generator=g)
    for k in (1, 50, 200):
        assert torch.equal(topk_sample(l, seed, 0.8, k, e), topk_sample_ref(l, e, 0.8, k)), k
    got = topk_sample(l, seed, 0.8, 200)
    assert logits_to_probs(l, 0.8, 200).gather(1, got).gt(0).all() and torch.equal(got, topk_sample(l, seed, 0.8, 200))
    n, V = 20000, 1000
    row = (torch.randn(1, V, device='cuda', generator=g) * 2).to(torch.bfloat16)
    draws = topk_sample(row.expand(n, V).contiguous(), torch.randint(0, 2**31 - 1, (n,), device='cuda', generator=g), 0.8, 20)
    tv = 0.5 * (torch.bincount(draws.flatten(), minlength=V).float() / n - logits_to_probs(row, 0.8, 20)[0]).abs().sum().item()
    assert tv < 0.03, tv
    m = Transformer(llama()).cuda().to(torch.bfloat16).eval(); m.init_freqs()
    keep, K.SAMPLE_KERNEL = K.SAMPLE_KERNEL, True
    try:
        a = generate(m, list(range(5, 17)), 40, temperature=0.8, top_k=50, compile=True, seed=3)
        b = generate(m, list(range(5, 17)), 40, temperature=0.8, top_k=50, compile=True, seed=3)
        c = generate(m, list(range(5, 17)), 40, temperature=0.8, top_k=50, seed=3)   # eager, the same kernel
    finally: K.SAMPLE_KERNEL = keep
    assert a == b and len(a) == 40 and len(c) == 40, (a, b, c)
