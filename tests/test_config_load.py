"""Loading a checkpoint's config.json: what it must state (the fields that set weight shapes), the one-line refusals of bad
input, and the bound on max_seq_len that keeps the RoPE tables from eating the machine."""
import dataclasses, json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import save_model
from metai.config import ModelConfig, ConfigError, PRESETS, SHAPE_FIELDS, MAX_ROPE_TABLE_BYTES
from metai.model.rope import precompute_freqs
from metai.model.transformer import Transformer

FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
MICRO = ModelConfig.preset('micro')

def write(tmp_path, d, name='config.json'):
    p = tmp_path/name; p.write_text(json.dumps(d, indent=2)); return p

def line_of(p, key):
    return next(i for i, l in enumerate(Path(p).read_text().splitlines(), 1) if f'"{key}"' in l)

def refused(p, regex):
    "from_json(p) raises a one-line ValueError matching `regex`; returns the message."
    with pytest.raises(ValueError, match=regex) as e: ModelConfig.from_json(p)
    msg = str(e.value)
    assert '\n' not in msg and msg.startswith(str(p)), msg
    return msg

# ---------------------------------------------------------------- what a config.json must state

@pytest.mark.parametrize('field', SHAPE_FIELDS)
def test_missing_shape_field_is_refused(tmp_path, field):
    p = write(tmp_path, {k: v for k, v in MICRO.to_dict().items() if k != field})
    refused(p, rf"^{p}: missing field '{field}' \(a config.json states every field that sets a weight shape\)$")
    with pytest.raises(ConfigError, match=f"missing field '{field}'") as e: ModelConfig.from_dict({k: v for k, v in MICRO.to_dict().items() if k != field})
    assert e.value.field == field

@pytest.mark.parametrize('field', [f for f in FIELDS if f not in SHAPE_FIELDS])
def test_missing_other_field_takes_its_default(tmp_path, field):
    p = write(tmp_path, {k: v for k, v in MICRO.to_dict().items() if k != field})
    assert ModelConfig.from_json(p) == dataclasses.replace(MICRO, **{field: getattr(ModelConfig(), field)})

def test_missing_fields_listed_and_given_values_checked_first(tmp_path):
    p = write(tmp_path, {})
    msg = refused(p, rf"^{p}: missing fields 'vocab_size', 'dim', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim' and 16 more \(")
    p = write(tmp_path, {'dim': 64, 'n_heads': 5})                     # the omission first: the defaults would blame n_heads
    refused(p, rf"^{p}: missing fields 'vocab_size', 'n_layers', 'n_kv_heads', ")
    gpt2 = ModelConfig.preset('gpt2').to_dict(); del gpt2['dim']          # not "n_heads=12: must divide dim=256" (a default)
    refused(write(tmp_path, gpt2), rf"^{tmp_path/'config.json'}: missing field 'dim' \(")
    full = {**ModelConfig.preset('micro').to_dict(), 'n_heads': 5}      # a wrong value in a whole file is reported where it stands
    p = write(tmp_path, full)
    refused(p, rf'^{p}:{line_of(p, "n_heads")}: n_heads=5: must divide dim=')
    tiny = ModelConfig.preset('ds-tiny').to_dict()                     # MLA whose sizes are left out: the omission is the error,
    p = write(tmp_path, {k: v for k, v in tiny.items() if k not in ('kv_lora_rank', 'v_head_dim')})   # not "kv_lora_rank=0"
    refused(p, rf"^{p}: missing fields 'kv_lora_rank', 'v_head_dim' \(")

def test_every_config_the_project_writes_loads(tmp_path):
    for name in PRESETS:
        c = ModelConfig.preset(name)
        assert set(json.loads(open(c.to_json(tmp_path/f'{name}.json')).read())) == set(FIELDS)
        assert ModelConfig.from_json(tmp_path/f'{name}.json') == c

def _signature(cfg):
    """Names and shapes of what model.safetensors holds for `cfg` (parameters, tied ones once, persistent buffers), and the
    parameter count of the accounting."""
    with torch.device('meta'): m = Transformer(cfg)
    sd = m.state_dict()
    return ({**{n: tuple(p.shape) for n, p in m.named_parameters()}, **{n: tuple(b.shape) for n, b in m.named_buffers() if n in sd}},
            cfg.hub_params())

def _variants(cfg, f):
    v = getattr(cfg, f)
    if isinstance(v, bool): cands = [not v]
    elif isinstance(v, str): cands = {'attn_type': ['gqa', 'mla'], 'score_func': ['softmax', 'sigmoid']}[f]
    elif isinstance(v, int): cands = [v + 2, 2 * v, 0, 1, 16]
    else: cands = [2 * v, v / 2, 1.5]
    for x in cands:
        if x == v: continue
        c = dataclasses.replace(cfg, **{f: x})
        try: yield c.validate()
        except ConfigError: pass

def test_shape_fields_are_the_fields_that_change_the_weights():
    dense = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
    ds = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, attn_type='mla', q_lora_rank=16, kv_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, ffn_dim=48, n_routed_experts=8, n_shared_experts=1,
                     n_activated_experts=2, moe_ffn_dim=16, n_dense_layers=1, score_func='sigmoid', n_expert_groups=2,
                     n_limited_groups=1, mtp_depth=1, index_n_heads=2, index_head_dim=16, index_topk=8, max_seq_len=32).validate()
    mla_sizes = dataclasses.replace(dense, n_kv_heads=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    changes = set()
    for base in (dense, ds, mla_sizes):                                 # the last one may switch attn_type alone
        sig = _signature(base)
        for f in FIELDS:
            if any(_signature(c) != sig for c in _variants(base, f)): changes.add(f)
    assert changes == set(SHAPE_FIELDS)

# ---------------------------------------------------------------- bad values, bad JSON

BAD = [('dim', '768', "dim='768': expected int, got str"), ('n_layers', 2.5, 'n_layers=2.5: expected int, got float'),
       ('n_heads', None, 'n_heads=None: expected int, got NoneType'), ('n_layers', True, 'n_layers=True: expected int, got bool'),
       ('vocab_size', [1], 'vocab_size=[1]: expected int, got list'), ('dim', {'a': 1}, "dim={'a': 1}: expected int, got dict"),
       ('tie_embeddings', 1, 'tie_embeddings=1: expected bool'), ('tie_embeddings', None, 'tie_embeddings=None: expected bool'),
       ('attn_type', None, 'attn_type=None: expected str'), ('attn_type', 'GQA', "attn_type='GQA': must be one of gqa, mla"),
       ('rope_theta', '1e4', "rope_theta='1e4': expected a finite float"), ('rope_theta', 10**400, 'rope_theta=inf: expected a finite float'),
       ('norm_eps', None, 'norm_eps=None: expected a finite float'), ('dim', -256, 'dim=-256: must be positive'),
       ('max_seq_len', 100_000_000, 'max_seq_len=100000000: its fp32 RoPE tables would take 23.84 GiB, over the 4.00 GiB limit')]

@pytest.mark.parametrize('field,value,why', BAD, ids=[f'{f}={v!r}'[:40] for f, v, _ in BAD])
def test_bad_value_names_file_line_field(tmp_path, field, value, why):
    p = write(tmp_path, {**MICRO.to_dict(), field: value})
    refused(p, rf'^{p}:{line_of(p, field)}: ' + re.escape(why))

def test_not_an_object_unknown_duplicate_and_unparseable(tmp_path):
    p = tmp_path/'config.json'
    for text, kind in (('null', 'NoneType'), ('7', 'int'), ('"dim"', 'str'), ('[]', 'list'), ('true', 'bool')):
        p.write_text(text)
        refused(p, rf'^{p}:1: expected a JSON object of ModelConfig fields, got {kind}$')
    p = write(tmp_path, {**MICRO.to_dict(), 'n_layer': 2})
    refused(p, rf"^{p}:{line_of(p, 'n_layer')}: unknown key 'n_layer' \(did you mean 'n_layers'\?\)$")
    p.write_text(json.dumps(MICRO.to_dict(), indent=2).replace('"dim": 256,', '"dim": 256,\n  "dim": 512,'))
    refused(p, rf"^{p}:4: duplicate key 'dim'$")                      # the second one: JSON alone would keep 512
    p.write_text(json.dumps(MICRO.to_dict(), indent=2).replace('"dim": 256,', '"dim": 256,\n  "dim": 512,\n  "dim": 768,'))
    refused(p, rf"^{p}:4: duplicate key 'dim'$")                      # given three times: still the second one
    p.write_text('{"dim": 1' + '0' * 5000 + '}')
    refused(p, rf'^{p}: bad JSON: Exceeds the limit \(4300 digits\) for integer string conversion: value has 5001 digits$')
    p.write_text('[' * 100_000 + ']' * 100_000)
    refused(p, rf'^{p}: bad JSON: ')

# ---------------------------------------------------------------- max_seq_len and the RoPE tables

@pytest.mark.parametrize('name', list(PRESETS))
def test_rope_table_bytes_is_what_the_model_builds(name):
    c = ModelConfig.preset(name)
    assert c.rope_table_bytes() <= MAX_ROPE_TABLE_BYTES
    cos, sin = precompute_freqs(c, max_seq_len=1000)
    assert cos.nbytes + sin.nbytes == c.rope_table_bytes(1000)
    assert c.rope_table_bytes() == c.max_seq_len * c.rope_table_bytes(1)

def test_max_seq_len_bound():
    for c in (MICRO, ModelConfig.preset('ds-tiny')):                  # head of 64, MLA RoPE part of 16
        most = MAX_ROPE_TABLE_BYTES // c.rope_table_bytes(1)
        dataclasses.replace(c, max_seq_len=most).validate()
        with pytest.raises(ConfigError, match=rf'^max_seq_len={most + 1}: its fp32 RoPE tables .* \(at most {most} positions') as e:
            dataclasses.replace(c, max_seq_len=most + 1).validate()
        assert e.value.field == 'max_seq_len'
    big = dataclasses.replace(MICRO, max_seq_len=100_000_000)
    with pytest.raises(ValueError, match='^max_seq_len=100000000'): Transformer(big)          # refused before any table is built
    with pytest.raises(ValueError, match='^max_seq_len=100000000'), torch.device('meta'): Transformer(big)
    with pytest.raises(ValueError, match='max_seq_len'): ModelConfig.preset('micro', max_seq_len=100_000_000)
    with pytest.raises(ConfigError, match=r'^max_seq_len=1000000000\d*\.\.\. \(321 characters\): .* more than a yottabyte'):
        dataclasses.replace(MICRO, max_seq_len=10**320).validate()       # no OverflowError from sizing it, and not 321 digits

def test_hf_config_with_huge_context_is_refused():
    from metai.model.hf import config_from_hf
    d = dict(model_type='llama', vocab_size=64, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
             intermediate_size=128, max_position_embeddings=100_000_000)
    with pytest.raises(ValueError, match=r'^hf/config.json: max_seq_len=100000000: its fp32 RoPE tables'): config_from_hf(d, 'hf/config.json')
    assert config_from_hf({**d, 'max_position_embeddings': 131072}, 'hf/config.json').max_seq_len == 131072
    big = dict(d, hidden_size=4096, num_attention_heads=32, max_position_embeddings=4_194_304)   # Llama-3-8B at 4M positions: 2 GiB
    assert config_from_hf(big, 'hf/config.json').rope_table_bytes() == 2 * 2**30

# ---------------------------------------------------------------- the command line

def _metai(*args):
    exe = Path(sys.executable).parent/'metai'
    r = subprocess.run([str(exe if exe.exists() else shutil.which('metai')), *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'}, timeout=300)
    return r.returncode, r.stdout, r.stderr

def test_cli_refuses_broken_config_in_one_line(tmp_path, capsys, monkeypatch):
    from metai.data.tokenizer import train_tokenizer
    from metai.cli import main
    monkeypatch.delenv('METAI_DEBUG', raising=False)
    def _metai(*args):  # in this process: the same main() as the script, without starting Python each time
        rc = main([str(a) for a in args]); r = capsys.readouterr(); return rc, r.out, r.err
    d = tmp_path/'ck'; d.mkdir()
    docs = [f'The quick brown fox {i} jumps over the lazy dog.' for i in range(100)]
    tok = train_tokenizer(docs, d/'tokenizer.model', vocab_size=400, num_threads=1)
    cfg = ModelConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, ffn_dim=64, max_seq_len=64)
    torch.manual_seed(0); save_model(Transformer(cfg), str(d/'model.safetensors')); good = cfg.to_dict()
    cases = [({k: v for k, v in good.items() if k != 'n_layers'}, f"{d}/config.json: missing field 'n_layers'"),
             ({**good, 'dim': '32'}, f"{d}/config.json:3: dim='32': expected int, got str"),
             ({**good, 'max_seq_len': 100_000_000}, f'{d}/config.json:{list(good).index("max_seq_len") + 2}: max_seq_len=100000000: its fp32 RoPE tables')]
    for cfg_dict, want in cases:
        write(d, cfg_dict)
        rc, out, err = _metai('generate', '--model-dir', d, '--prompt', 'hi', '--max-new-tokens', 2, '--device', 'cpu')
        assert rc == 1 and out == '' and err.count('\n') == 1 and 'Traceback' not in err, err
        assert err.startswith(f'metai generate: error: {want}'), err
    write(d, {k: v for k, v in good.items() if k != 'mtp_distill'})   # a non-shape field left out: still loads
    rc, out, err = _metai('generate', '--model-dir', d, '--prompt', 'hi', '--max-new-tokens', 2, '--device', 'cpu')
    assert (rc, err) == (0, ''), err
    write(d, {'dim': 32})
    rc, out, err = _metai('config', d)
    assert rc == 1 and err.count('\n') == 1 and err.startswith(f"metai config: error: {d}/config.json: missing fields 'vocab_size'"), err

def sparse_weights(model, path):
    "A safetensors file whose header matches `model` (built on meta) and whose data is a hole: no disk or memory taken."
    header, off = {}, 0
    for k, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        header[k] = {'dtype': {torch.float32: 'F32', torch.bfloat16: 'BF16'}[t.dtype], 'shape': list(t.shape), 'data_offsets': [off, off + n]}
        off += n
    h = json.dumps(header).encode(); h += b' ' * (-len(h) % 8)
    with open(path, 'wb') as f:
        f.write(len(h).to_bytes(8, 'little')); f.write(h); f.truncate(8 + len(h) + off)

def test_model_larger_than_memory_is_one_line(tmp_path, capsys):
    "A config.json (and a file that matches it) too large for the machine: one line naming the file and the size, not to_empty's error."
    from metai.core import device_memory
    from metai.cli import main
    ram = device_memory('cpu')
    cfg = dataclasses.replace(MICRO, vocab_size=2 * ram // (MICRO.dim * 4) + 1, n_layers=1)   # the tied table alone: twice the RAM in fp32
    d = tmp_path/'big'; d.mkdir(); cfg.to_json(d/'config.json')
    with torch.device('meta'): m = Transformer(cfg)
    try: sparse_weights(m, d/'model.safetensors')
    except OSError as e: pytest.skip(f'no sparse file here ({e})')
    try: rc = main(['generate', '--model-dir', str(d), '--prompt', 'hi', '--device', 'cpu'])
    except SystemExit as e: rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, (rc, err)
    assert re.search(rf'big/config.json: [\d.]+B parameters \(vocab_size={cfg.vocab_size}, dim=256, n_layers=1\) in float32 take [\d.]+ GiB, '
                     r'more than the [\d.]+ GiB of cpu memory', err), err
