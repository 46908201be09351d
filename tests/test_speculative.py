"""Tests for metai.infer.speculative: greedy speculative output == plain greedy output (draft model and MTP, dense and
MLA/MoE, gamma 1..8), sampled output follows the target's distribution (chi-square, and wrong rules are caught; every
position of whole rounds, gamma 1..8, plain and top-k/top-p, against exact marginals), caches
are rolled back and kept in sync, chat across turns, loading a draft model, bad input, and the benchmark script."""
import os, sys, copy, json, shutil, subprocess
import pytest
import torch
from safetensors.torch import save_model
from metai.config import ModelConfig
from metai.model.transformer import Transformer
from metai.data.tokenizer import train_tokenizer
from metai.infer.cache import make_cache, set_mla_mode
from metai.infer.generate import generate, logits_to_probs, multinomial_no_sync, ChatSession
import metai.infer.speculative as S
from metai.infer.speculative import (speculative_accept, greedy_accept, chisquare_pvalue, forward_hidden, mtp_step,
                                     speculative_generate, mtp_speculative_generate, load_draft_model, format_stats,
                                     SpeculativeChatSession)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad(): yield

def tiny(**kw):
    d = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=96, init_std=0.1)
    return ModelConfig(**{**d, **kw})

MLA = dict(attn_type='mla', n_kv_heads=0, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
           v_head_dim=16, rope_interleaved=True)
MOE = dict(n_routed_experts=8, n_activated_experts=2, moe_ffn_dim=32)
DS = dict(**MLA, **MOE, score_func='sigmoid', n_shared_experts=1, n_dense_layers=1)

def build(cfg, seed=0):
    torch.manual_seed(seed)
    return set_mla_mode(Transformer(cfg).eval(), None)

def noisy_copy(m, scale, seed=0):
    d = copy.deepcopy(m); g = torch.Generator().manual_seed(seed)
    for p in d.parameters(): p.add_(scale * p.std() * torch.randn(p.shape, generator=g).to(p.device))
    return d

# ---------------------------------------------------------------------------------------------------- greedy identity

@pytest.mark.parametrize('arch', ['GQA', 'MLA+MoE'])
def test_greedy_identical_to_generate(arch):
    t = build(tiny() if arch == 'GQA' else tiny(**DS))
    drafts = {'random': build(tiny(dim=32, n_layers=1), seed=1), 'itself': t, 'noisy': noisy_copy(t, 0.15)}
    prompts = [[1, 17, 42, 99, 5], [3, 4], [7] * 9]
    ref = generate(t, prompts, 32, temperature=0)
    partial = 0
    for g in range(1, 9):
        for name, d in drafts.items():
            out, st = speculative_generate(t, d, prompts[0], 32, gamma=g, temperature=0)
            assert out == ref[0], (name, g)
            if name == 'itself': assert st['acceptance_rate'] == 1.0 and st['accept_counts'][g] == st['rounds']
            if name == 'random': assert st['acceptance_rate'] < 0.2
            if name == 'noisy': partial += sum(st['accept_counts'][1:g])
        assert speculative_generate(t, drafts['noisy'], prompts, 32, gamma=g, temperature=0)[0] == ref, g   # ragged batch
    assert partial > 20   # rounds that kept some but not all drafts: the rollback was exercised

def test_stop_token_and_context_end():
    t = build(tiny()); d = noisy_copy(t, 0.15)
    ref = generate(t, [1, 2, 3], 30, temperature=0)
    stop = ref[12]
    assert speculative_generate(t, d, [1, 2, 3], 30, gamma=4, temperature=0, eos_id=[stop, 10**4])[0] == ref[:ref.index(stop)]
    assert speculative_generate(t, d, [5] * 90, 50, gamma=4, temperature=0)[0] == generate(t, [5] * 90, 50, temperature=0)
    assert len(speculative_generate(t, d, [5] * 96, 50, gamma=8, temperature=0)[0]) == 1

def test_same_seed_same_output():
    t = build(tiny()); d = noisy_copy(t, 0.3)
    a = speculative_generate(t, d, [1, 2, 3], 24, gamma=3, temperature=1.0, seed=5)[0]
    assert a == speculative_generate(t, d, [1, 2, 3], 24, gamma=3, temperature=1.0, seed=5)[0]
    assert a != speculative_generate(t, d, [1, 2, 3], 24, gamma=3, temperature=1.0, seed=6)[0]

@pytest.mark.parametrize('depth', [1, 2])
def test_mtp_greedy_identical(depth):
    m = build(tiny(**DS, mtp_depth=depth))
    prompts = [[1, 17, 42, 99, 5], [3, 4], [7] * 9, [8]]
    ref = generate(m, prompts, 24, temperature=0)
    for g in range(1, 7):
        assert mtp_speculative_generate(m, prompts, 24, gamma=g, temperature=0)[0] == ref, g
        assert mtp_speculative_generate(m, prompts[0], 24, gamma=g, temperature=0)[0] == ref[0], g

# ---------------------------------------------------------------------------------------------------- caches

def fresh_cache(m, seq):
    c = make_cache(m, 1, 64)
    m(torch.tensor([seq]), cache=c, use_mtp=m.cfg.mtp_depth > 0)
    return c

def test_rollback_leaves_exact_cache_entries():
    "Entries each cache claims to hold equal a fresh single forward's; garbage in unused slots changes nothing."
    t = build(tiny(**DS)); d = noisy_copy(t, 0.15)
    tc, dc = make_cache(t, 1, 64, mtp=False), make_cache(d, 1, 64, mtp=False)
    out, st = speculative_generate(t, d, [1, 2, 3, 4, 5, 6], 40, gamma=5, temperature=0, cache=tc, draft_cache=dc)
    assert sum(st['accept_counts'][:5]) > 0       # there were rejections
    seq = [1, 2, 3, 4, 5, 6] + out
    rt, rd = fresh_cache(t, seq), fresh_cache(d, seq)
    nc, nd = st['cached'][0], st['draft_cached'][0]
    assert nc >= len(seq) - 2 and nd >= len(seq) - 8
    for j in range(2):
        torch.testing.assert_close(tc.a[j][:, :nc], rt.a[j][:, :nc], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(tc.b[j][:, :nc], rt.b[j][:, :nc], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(dc.a[j][:, :nd], rd.a[j][:, :nd], atol=1e-4, rtol=1e-4)
    for x in tc.a + tc.b + dc.a + dc.b: x.normal_(0, 100)
    assert speculative_generate(t, d, [1, 2, 3, 4, 5, 6], 40, gamma=5, temperature=0, cache=tc, draft_cache=dc)[0] == out

@pytest.mark.parametrize('depth,gamma', [(1, 1), (1, 3), (2, 2), (2, 4)])
def test_mtp_slots_in_sync(depth, gamma):
    m = build(tiny(**DS, mtp_depth=depth))
    mc = make_cache(m, 1, 64)
    out, st = mtp_speculative_generate(m, [1, 2, 3, 4, 5], 30, gamma=gamma, temperature=1.0, seed=0, cache=mc)
    ref = fresh_cache(m, [1, 2, 3, 4, 5] + out)
    nc, nm = st['cached'][0], st['draft_cached'][0]
    assert nm >= len(out) + 5 - 2 - depth - gamma
    for j in range(m.cfg.n_layers + depth):
        upto = nc if j < m.cfg.n_layers else nm
        torch.testing.assert_close(mc.a[j][:, :upto], ref.a[j][:, :upto], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(mc.b[j][:, :upto], ref.b[j][:, :upto], atol=1e-4, rtol=1e-4)

def test_static_steps_match_model():
    m = build(tiny(**DS, mtp_depth=2))
    x = torch.randint(0, 256, (2, 10))
    logits, _, aux = m(x, use_mtp=True)
    c = make_cache(m, 2, 16)
    lg, h = forward_hidden(m, x, torch.arange(10), c)
    torch.testing.assert_close(lg, logits, atol=1e-4, rtol=1e-4); torch.testing.assert_close(h, aux['hidden'], atol=1e-4, rtol=1e-4)
    l0, h1 = mtp_step(m, 0, h[:, :9], x[:, 1:], torch.arange(9), c)
    torch.testing.assert_close(l0, aux['mtp_logits'][0], atol=1e-4, rtol=1e-4)
    l1, _ = mtp_step(m, 1, h1[:, :8], x[:, 2:], torch.arange(8), c)
    torch.testing.assert_close(l1, aux['mtp_logits'][1], atol=1e-4, rtol=1e-4)

# ---------------------------------------------------------------------------------------------------- distributions

V = 8
def vtiny(seed): return build(ModelConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=32, init_std=0.5), seed)

@pytest.fixture(scope='module')
def pair():
    with torch.no_grad():
        t, d = vtiny(0), vtiny(1)
        prompt = [1, 2, 3]
        p1 = logits_to_probs(t(torch.tensor([prompt]))[0][0, -1])
        p2 = (p1[:, None] * logits_to_probs(t(torch.tensor([prompt + [v] for v in range(V)]))[0][:, -1])).sum(0)
    return t, d, prompt, p1, p2

def pvalues(t, d, prompt, p1, p2, N=20_000, **kw):
    out = torch.tensor(speculative_generate(t, d, [prompt] * N, 2, temperature=1.0, **kw)[0])
    return (chisquare_pvalue(torch.bincount(out[:, 0], minlength=V), p1), chisquare_pvalue(torch.bincount(out[:, 1], minlength=V), p2))

@pytest.mark.parametrize('gamma', range(1, 9))
def test_sampling_follows_target_distribution(pair, gamma):
    "Chi-square test at the 0.001 level (fixed seeds: deterministic) of the first and the second new token."
    t, d, prompt, p1, p2 = pair
    pa, pb = pvalues(t, d, prompt, p1, p2, gamma=gamma, seed=gamma)
    assert pa > 1e-3 and pb > 1e-3, (pa, pb)

def always_accept(draft_tokens, draft_probs, target_probs):
    B, g = draft_tokens.shape
    return torch.full((B,), g), multinomial_no_sync(target_probs[:, -1])[:, 0]

_right = speculative_accept
def resample_from_p(draft_tokens, draft_probs, target_probs):
    n, _ = _right(draft_tokens, draft_probs, target_probs)
    return n, multinomial_no_sync(target_probs[torch.arange(len(n)), n])[:, 0]

@pytest.mark.parametrize('rule', [always_accept, resample_from_p])
def test_wrong_rules_are_caught(pair, rule, monkeypatch):
    "The same statistical test rejects an acceptance rule that is not exact."
    t, d, prompt, p1, p2 = pair
    monkeypatch.setattr(S, 'speculative_accept', rule)
    for g in (1, 4):
        assert min(pvalues(t, d, prompt, p1, p2, gamma=g, seed=g)) < 1e-6

def test_accept_rule_alone():
    p = torch.tensor([0.30, 0.20, 0.15, 0.10, 0.10, 0.08, 0.05, 0.02]); q = p.flip(0)
    N = 200_000
    torch.manual_seed(0)
    x = multinomial_no_sync(q.expand(N, 8))
    n, nxt = speculative_accept(x, q.expand(N, 1, 8), p.expand(N, 2, 8))
    first = torch.where(n > 0, x[:, 0], nxt)
    assert chisquare_pvalue(torch.bincount(first, minlength=8), p) > 1e-3
    assert chisquare_pvalue(torch.bincount(first, minlength=8), q) < 1e-12
    assert abs(n.float().mean().item() - torch.minimum(p, q).sum().item()) < 4 / N ** 0.5
    lg = torch.zeros(1, 4, 8); lg[0, torch.arange(4), torch.tensor([2, 5, 3, 7])] = 1.0
    n, nxt = greedy_accept(torch.tensor([[2, 5, 1]]), lg)
    assert (n.item(), nxt.item()) == (2, 3)

def test_chisquare_pvalue():
    import math
    assert abs(chisquare_pvalue([60, 20, 20], [1, 1, 1]) - math.exp(-16)) < 1e-12
    assert chisquare_pvalue([3, 0, 1], [0.5, 0.5, 0]) == 0.0
    with pytest.raises(ValueError, match='counts: .3,. cells'): chisquare_pvalue([1, 2, 3], [0.5, 0.5])

def test_mtp_sampling_distribution():
    m = build(ModelConfig(vocab_size=V, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=32, init_std=0.5, mtp_depth=1))
    prompt = [1, 2, 3]
    p1 = logits_to_probs(m(torch.tensor([prompt]))[0][0, -1])
    p2 = (p1[:, None] * logits_to_probs(m(torch.tensor([prompt + [v] for v in range(V)]))[0][:, -1])).sum(0)
    for g in (1, 3):
        out = torch.tensor(mtp_speculative_generate(m, [prompt] * 20_000, 2, gamma=g, temperature=1.0, seed=g)[0])
        assert chisquare_pvalue(torch.bincount(out[:, 0], minlength=V), p1) > 1e-3
        assert chisquare_pvalue(torch.bincount(out[:, 1], minlength=V), p2) > 1e-3

# ---------------------------------------------------------------------------------------------------- whole rounds, exact marginals
# Every position of a whole round (the accepted drafts, the residual's draw and the bonus token) against the target's exact
# marginal distribution at that position. With 4 tokens the prefix tree of 9 new tokens is small enough to enumerate, so the
# marginals are exact (up to fp rounding), with the same `logits_to_probs` (temperature, then top-k, then top-p) that
# `speculative_generate` uses for the target. All prompts are the same, so every row plays its first round (after MTP's plain
# first step: its second) at the same positions. One Pearson chi-square test per (case, position); Bonferroni over all of them:
# each p-value must exceed ALPHA / N_TESTS, so a correct implementation fails this section with probability < ALPHA (seeds
# fixed: deterministic).

V4, N_ROWS, ALPHA, PROMPT4 = 4, 10_000, 1e-3, [1, 2, 3]
def small4(seed, **kw):
    return build(ModelConfig(vocab_size=V4, dim=8, n_layers=1, n_heads=1, ffn_dim=16, max_seq_len=32, init_std=0.5, **kw), seed)

TOPK, TOPP = dict(temperature=0.8, top_k=2), dict(temperature=0.7, top_p=0.9)   # truncated sampling (both models'); TOPP: the chat default
DRAFT_CASES = [(g, {}) for g in range(1, 9)] + [(g, TOPK) for g in (1, 3, 5, 8)] + [(g, TOPP) for g in (2, 4, 7)]
MTP_CASES = [(g, {}) for g in range(1, 9)] + [(3, TOPK), (6, TOPP)]             # mtp_depth 1: any gamma >= 1 (the module repeats)
N_TESTS = sum(g + 1 for g, _ in DRAFT_CASES) + sum(g + 2 for g, _ in MTP_CASES)   # positions tested, all cases together
def case_id(c): return f"g{c[0]}" + ''.join(f"-{k}{v}" for k, v in c[1].items())

@pytest.fixture
def one_thread():
    "Tiny matmuls on many rows: one thread is several times faster than two on a busy 2-core machine."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def exact_marginals(model, prompt, K, temperature=1.0, top_k=None, top_p=None):
    "(K, V) float64: the exact distribution of each of the first K new tokens that `model` samples with these settings."
    seqs, w, out = torch.tensor([prompt]), torch.ones(1, dtype=torch.float64), []   # the prefixes and their probabilities
    for k in range(K):
        lg = torch.cat([model(s)[0][:, -1] for s in seqs.split(4096)])               # plain forwards, no cache
        joint = w[:, None] * logits_to_probs(lg, temperature, top_k, top_p).double()  # (prefixes, V) prefix and next token
        out.append(joint.sum(0))
        w, keep = joint.flatten(), joint.flatten() > 0                                 # tokens top-k/top-p cut: never extended
        seqs = torch.cat([seqs.repeat_interleave(V4, 0), torch.arange(V4).repeat(len(seqs))[:, None]], 1)[keep]; w = w[keep]
    return torch.stack(out)

@pytest.fixture(scope='module')
def models4():
    with torch.no_grad():
        t = small4(0)
        return dict(target=t, draft=noisy_copy(t, 0.3), mtp=small4(0, mtp_depth=1), marginals={})

def marginals4(models4, kind, K, kw):
    key = (kind, tuple(sorted(kw.items())))
    if key not in models4['marginals'] or len(models4['marginals'][key]) < K:
        models4['marginals'][key] = exact_marginals(models4[kind], PROMPT4, max(K, 10 if kind == 'mtp' else 9), **kw)
    return models4['marginals'][key][:K]

def check_positions(out, ms, what):
    "One chi-square test per position of `out` (N, K) against the exact marginals `ms` (K, V)."
    out = torch.tensor(out)
    assert out.shape == (N_ROWS, len(ms)), (what, out.shape)
    assert ((ms > 0.01).sum(1) >= 2).all(), (what, ms)   # no position is (nearly) certain: each test can fail
    pv = [chisquare_pvalue(torch.bincount(out[:, j], minlength=V4), ms[j]) for j in range(len(ms))]
    assert min(pv) > ALPHA / N_TESTS, (what, ['%.1e' % p for p in pv])

@pytest.mark.parametrize('gamma,kw', DRAFT_CASES, ids=[case_id(c) for c in DRAFT_CASES])
def test_whole_round_follows_target(models4, one_thread, gamma, kw):
    "Draft model: new tokens 1..gamma+1 (a whole first round, bonus token included) each follow the target's exact marginal."
    t, d = models4['target'], models4['draft']
    out, st = speculative_generate(t, d, [PROMPT4] * N_ROWS, gamma + 1, gamma=gamma, seed=1000 + gamma, **{'temperature': 1.0, **kw})
    assert st['accept_counts'][gamma] > 0 and st['accept_counts'][0] > 0   # rounds end with the bonus token and at a rejection
    check_positions(out, marginals4(models4, 'target', gamma + 1, kw), (gamma, kw))

@pytest.mark.parametrize('gamma,kw', MTP_CASES, ids=[case_id(c) for c in MTP_CASES])
def test_mtp_whole_round_follows_target(models4, one_thread, gamma, kw):
    "MTP (depth 1): a plain first step (no h^0 yet), then a whole round: new tokens 1..gamma+2 each follow the exact marginal."
    m = models4['mtp']
    out, st = mtp_speculative_generate(m, [PROMPT4] * N_ROWS, gamma + 2, gamma=gamma, seed=2000 + gamma, **{'temperature': 1.0, **kw})
    assert st['accept_counts'][gamma] > 0 and st['accept_counts'][0] > 0
    check_positions(out, marginals4(models4, 'mtp', gamma + 2, kw), (gamma, kw))

# ---------------------------------------------------------------------------------------------------- chat, loading, errors

@pytest.fixture(scope='module')
def tok(tmp_path_factory):
    docs = ([f'The quick brown fox {i} jumps over the lazy dog. Hello world!' for i in range(100)] +
            ['我们今天学习语言模型。你好世界！中文 English mixed text 123.'] * 30)
    return train_tokenizer(docs, str(tmp_path_factory.mktemp('tok') / 'tokenizer.model'), vocab_size=400, num_threads=1)

def test_chat_matches_plain_chat(tok):
    t = build(tiny(vocab_size=400, max_seq_len=256)); d = noisy_copy(t, 0.15)
    m = build(tiny(vocab_size=400, max_seq_len=256, mtp_depth=1))
    for model, spec in [(t, SpeculativeChatSession(t, tok, draft=d, gamma=3, temperature=0, max_new_tokens=20)),
                        (m, SpeculativeChatSession(m, tok, gamma=2, temperature=0, max_new_tokens=20))]:
        plain = ChatSession(model, tok, temperature=0, max_new_tokens=20)
        for msg in ['Hello!', 'What is the fox doing?', 'And the dog?']:
            assert spec.send(msg, stream=None) == plain.send(msg, stream=None)
        assert spec.n_cached > 20 and spec.n_draft > 0 and len(spec.stats) == 3
        assert 'tokens/s' in format_stats(spec.stats[-1]) and 'acceptance' in format_stats(spec.stats[-1])
    with pytest.raises(ValueError, match='has no MTP modules'): SpeculativeChatSession(t, tok)

def save_dir(model, path, tok_path=None):
    os.makedirs(path, exist_ok=True)
    model.cfg.to_json(os.path.join(path, 'config.json')); save_model(model, os.path.join(path, 'model.safetensors'))
    if tok_path: shutil.copy(tok_path, os.path.join(path, 'tokenizer.model'))
    return path

def test_load_draft_model(tmp_path, tok):
    t = build(tiny(vocab_size=400)); d = build(tiny(vocab_size=400, dim=32, n_layers=1), seed=1)
    dd = save_dir(d, tmp_path / 'draft', tok.path)
    dm = load_draft_model(dd, t, tok)
    assert torch.equal(dm.embed.weight, d.embed.weight)
    out, st = speculative_generate(t, dm, [1, 2, 3], 10, gamma=3, temperature=0)
    assert out == generate(t, [1, 2, 3], 10, temperature=0)
    other = train_tokenizer([f'Lorem ipsum dolor sit amet {i}, consectetur adipiscing elit.' for i in range(200)], str(tmp_path / 'o.model'), vocab_size=400, num_threads=1)
    save_dir(d, tmp_path / 'draft2', other.path)
    with pytest.raises(ValueError, match='draft2/tokenizer.model: a different tokenizer'): load_draft_model(tmp_path / 'draft2', t, tok)
    with pytest.raises(ValueError, match="draft vocab_size 256 differs from the target's 400"):
        load_draft_model(save_dir(build(tiny(dim=32, n_layers=1)), tmp_path / 'draft3'), t, tok)
    with pytest.raises(FileNotFoundError, match='no such model directory'): load_draft_model(tmp_path / 'nope', t, tok)
    short = save_dir(build(tiny(vocab_size=400, dim=32, n_layers=1, max_seq_len=48), seed=1), tmp_path / 'draft4', tok.path)
    with pytest.warns(UserWarning, match=r"draft4: the draft's context \(48 tokens\) is shorter than the target's \(96\)"):
        ds = load_draft_model(short, t, tok)
    assert len(speculative_generate(t, ds, [1, 2, 3], 90, gamma=3, temperature=0)[0]) == 48 - 3 + 1  # the draft's context ends the call

def test_bad_input():
    t = build(tiny()); m = build(tiny(mtp_depth=1))
    with pytest.raises(ValueError, match="draft: vocab_size 400 differs from the target's 256"): speculative_generate(t, build(tiny(vocab_size=400)), [1], 5)
    with pytest.raises(ValueError, match='has no MTP modules'): mtp_speculative_generate(t, [1, 2], 5)
    with pytest.raises(ValueError, match='gamma: must be an int >= 1'): speculative_generate(t, t, [1, 2], 5, gamma=0)
    with pytest.raises(ValueError, match='gamma: must be an int >= 1'): mtp_speculative_generate(m, [1, 2], 5, gamma=2.5)
    with pytest.raises(ValueError, match='prompt: empty'): speculative_generate(t, t, [], 5)
    with pytest.raises(ValueError, match=r'prompt_ids\[1\]: empty'): speculative_generate(t, t, [[1], []], 5)
    with pytest.raises(TypeError, match='encode it with the tokenizer'): speculative_generate(t, t, 'hello', 5)
    with pytest.raises(TypeError, match='got the int 5'): speculative_generate(t, t, 5, 5)
    with pytest.raises(ValueError, match='outside the vocabulary'): speculative_generate(t, t, [1, 256], 5)
    with pytest.raises(ValueError, match='max_new_tokens'): speculative_generate(t, t, [1], 0)
    with pytest.raises(ValueError, match='top_p'): speculative_generate(t, t, [1], 5, top_p=0)
    with pytest.raises(ValueError, match='start_pos: needs the cache'): speculative_generate(t, t, [1, 2, 3], 5, start_pos=1)
    with pytest.raises(ValueError, match='start_pos: 3 must be below'): speculative_generate(t, t, [1, 2, 3], 5, start_pos=3, cache=make_cache(t, 1, 16))
    with pytest.raises(ValueError, match='mtp_start_pos: needs the hidden states'): mtp_speculative_generate(m, [1, 2, 3], 5, mtp_start_pos=1, cache=make_cache(m, 1, 16), start_pos=1)
    with pytest.raises(ValueError, match=r'cache: holds 1 rows x 8 positions, this call needs 1 x 12'): speculative_generate(t, t, [1, 2, 3], 10, cache=make_cache(t, 1, 8))
    with pytest.raises(ValueError, match='cache: has 2 layer slots, MTP needs 3'): mtp_speculative_generate(m, [1, 2], 5, cache=make_cache(m, 1, 16, mtp=False))
    with pytest.raises(ValueError, match='stream: 1 streamers for 2 prompts'): speculative_generate(t, t, [[1], [2]], 5, stream=[None])

# ---------------------------------------------------------------------------------------------------- benchmark script

def test_bench_script_tiny(tmp_path):
    out = tmp_path / 'spec.json'
    r = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'bench_speculative.py'), '--device', 'cpu', '--tiny',
                        '--gammas', '1,3', '--mtp-gammas', '1', '--temperatures', '0', '--runs', '1', '--new-tokens', '16', '--out', str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    runs = res['pairs']['random early-exit draft']['runs']['0.0']
    assert runs['plain']['tokens_per_s'] > 0 and runs['gamma=3']['tokens_per_s'] > 0
    assert 0 < runs['gamma=3']['acceptance_rate'] <= 1 and runs['gamma=3']['tokens_per_target_forward'] >= 1
    assert 'speedup' in runs['gamma=1'] and 'gamma=1' in res['pairs']['random MTP']['runs']['0.0']

def prepared_data(path, tokens, vocab_size):
    "The two files of a `metai prepare-data` folder that the benchmarks read for a prompt: meta.json and val.bin."
    import numpy as np
    os.makedirs(path, exist_ok=True)
    (path / 'meta.json').write_text(json.dumps(dict(format=1, dtype='uint16', tokenizer=dict(vocab_size=vocab_size))))
    np.array(tokens, dtype=np.uint16).tofile(path / 'val.bin')
    return path

def test_bench_script_trained_dirs(tmp_path):
    "Model directories for target, two drafts and MTP; the prompt from held-out data; the MTP pair measured second."
    t = build(tiny(mtp_depth=1), seed=0)
    save_dir(t, tmp_path / 'target'); save_dir(noisy_copy(t, 0.1), tmp_path / 'd1'); save_dir(t, tmp_path / 'd2')
    data = prepared_data(tmp_path / 'data', [2] + [5, 6, 7, 8] * 20, 256)
    out = tmp_path / 'spec.json'
    args = [sys.executable, os.path.join(ROOT, 'scripts', 'bench_speculative.py'), '--device', 'cpu', '--target-dir', str(tmp_path / 'target'),
            '--draft-dir', f"{tmp_path / 'd1'},{tmp_path / 'd2'}", '--mtp-dir', str(tmp_path / 'target'), '--gammas', '2',
            '--mtp-gammas', '1', '--temperatures', '0', '--runs', '1', '--prompt-len', '8', '--new-tokens', '12', '--out', str(out)]
    r = subprocess.run(args + ['--prompt-data', str(data)], capture_output=True, text=True, timeout=600, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert list(res['pairs']) == ['trained draft d1', 'trained MTP', 'trained draft d2']
    assert all(p['prompt'] == 'validation text' for p in res['pairs'].values())
    assert res['pairs']['trained draft d2']['runs']['0.0']['gamma=2']['acceptance_rate'] == 1.0  # the target drafting for itself
    plain = res['pairs']['trained draft d1']['runs']['0.0']['plain']
    assert 1 <= plain['distinct_new_tokens'] <= 12 and len(plain['first_new_tokens']) == 12
    bad = prepared_data(tmp_path / 'bad', [2] + [300] * 10, 512)  # ids the model's 256-token vocabulary does not have
    r = subprocess.run(args + ['--prompt-data', str(bad)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'bad/val.bin: token ids up to 300, the model has 256' in r.stderr

@pytest.mark.parametrize('arch', ['GQA', 'MLA+MoE'])
def test_static_rounds_verify_forward(arch, monkeypatch):
    "Rounds that verify with notebook 09b's `verify_forward` (on CPU its references): the same greedy output and accept counts."
    import metai.infer.speculative as S, metai.infer.kernels as K
    monkeypatch.setattr(K, 'MTP_ROWS', True)  # the MTP module through `mtp_rows_step` too (off by default: no faster in a round)
    target = build(tiny(mtp_depth=1) if arch == 'GQA' else tiny(mtp_depth=1, **DS), seed=0)
    draft = noisy_copy(target, 0.3)
    prompt = list(range(3, 14))
    ref = generate(target, prompt, 30, temperature=0)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(S, 'verify_ok', lambda model, tokens, on=on: on)  # the switch's own rule wants CUDA and bf16
        runs[on] = [speculative_generate(target, draft, prompt, 30, gamma=3, temperature=0, static_rounds=True),
                    mtp_speculative_generate(target, prompt, 30, gamma=1, temperature=0, static_rounds=True)]
    for (a, sa), (b, sb) in zip(runs[False], runs[True]):
        assert a == b == ref and sa['accept_counts'] == sb['accept_counts']

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('gamma', [1, 4])
def test_cuda_compiled_greedy_identical(gamma):
    "compile=True on CUDA (short windows in CUDA graphs): greedy output equals plain greedy output, draft model and MTP."
    target = build(tiny(mtp_depth=1), seed=0).cuda()
    draft = noisy_copy(target, 0.3).cuda()
    prompt = list(range(3, 14))
    ref = generate(target, prompt, 30, temperature=0)
    assert speculative_generate(target, draft, prompt, 30, gamma=gamma, temperature=0, compile=True)[0] == ref
    assert mtp_speculative_generate(target, prompt, 30, gamma=gamma, temperature=0, compile=True)[0] == ref

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_static_rounds_verify_forward(monkeypatch):
    "bf16 rounds in CUDA graphs verified by `verify_forward` (`gemv_rows`): the target's own greedy choices, mostly plain greedy's."
    import metai.infer.kernels as K
    monkeypatch.setattr(K, 'ROWS_IN_VERIFY', True); monkeypatch.setattr(K, 'MTP_ROWS', True)
    target = build(tiny(mtp_depth=1), seed=0).cuda().to(torch.bfloat16); target.init_freqs()
    draft = noisy_copy(target, 0.3)
    assert K.verify_ok(target, torch.zeros(1, 5, dtype=torch.long, device='cuda')) and K.verify_ok(draft, torch.zeros(1, 2, dtype=torch.long, device='cuda'))
    prompt = list(range(3, 14))
    ref = generate(target, prompt, 40, temperature=0, compile=True)
    for out in (speculative_generate(target, draft, prompt, 40, gamma=4, temperature=0, compile=True)[0],
                mtp_speculative_generate(target, prompt, 40, gamma=1, temperature=0, compile=True)[0]):
        top2 = target(torch.tensor([prompt + out], device='cuda'))[0][0, len(prompt) - 1:-1].topk(2).indices.tolist()
        assert len(out) == 40 and all(t in k for t, k in zip(out, top2)), (out, top2)
        assert sum(a == b for a, b in zip(out, ref)) >= 10, (out, ref)  # bf16 rounding may split a near tie later on

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_static_rounds():
    "The batch-1 rounds in CUDA graphs: greedy equals plain greedy and the general loop; a seed reproduces a sample on reused caches."
    target = build(tiny(), seed=0).cuda()
    draft = noisy_copy(target, 0.3).cuda()
    prompt = list(range(3, 14))
    ref = generate(target, prompt, 40, temperature=0)
    out, st = speculative_generate(target, draft, prompt, 40, gamma=3, temperature=0, compile=True)
    slow, st_slow = speculative_generate(target, draft, prompt, 40, gamma=3, temperature=0, compile=True, static_rounds=False)
    assert out == ref == slow and st['accept_counts'] == st_slow['accept_counts']
    tc, dc = make_cache(target, 1, 64, mtp=False), make_cache(draft, 1, 64, mtp=False)
    runs = [speculative_generate(target, draft, prompt, 40, gamma=3, temperature=0.8, seed=5, compile=True, cache=tc, draft_cache=dc)[0]
            for _ in range(3)]  # the first captures the graphs, the others replay them
    assert runs[0] == runs[1] == runs[2] and len(runs[0]) == 40

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_static_rounds_in_flight(monkeypatch):
    "Two replays in flight on CUDA (pinned copies, events): the rounds, stops and stats of one in flight; a seed still reproduces a sample."
    target = build(tiny(mtp_depth=1), seed=0).cuda()
    draft = noisy_copy(target, 0.3).cuda()
    prompt = list(range(3, 14))
    ref = generate(target, prompt, 60, temperature=0)
    res = {}
    for n in (1, 2):
        monkeypatch.setattr(S, 'REPLAYS_IN_FLIGHT', n)
        r = res[n] = [speculative_generate(target, draft, prompt, 60, gamma=3, temperature=0, compile=True),
                      mtp_speculative_generate(target, prompt, 60, gamma=1, temperature=0, compile=True),
                      speculative_generate(target, draft, prompt, 60, gamma=3, temperature=0, compile=True, eos_id=ref[30])]
        assert r[0][0] == r[1][0] == ref and r[2][0] == ref[:ref.index(ref[30])]
        tc, dc = make_cache(target, 1, 96, mtp=False), make_cache(draft, 1, 96, mtp=False)
        runs = [speculative_generate(target, draft, prompt, 60, gamma=3, temperature=0.8, seed=5, compile=True, cache=tc, draft_cache=dc)[0]
                for _ in range(2)]
        assert runs[0] == runs[1] and len(runs[0]) == 60
    for (a, sa), (b, sb) in zip(res[1][:2], res[2][:2]):  # no stop: the same rounds (after a stop the last replay read may differ)
        assert sa['accept_counts'] == sb['accept_counts'] and sa['cached'] == sb['cached'] and sa['draft_cached'] == sb['draft_cached']
