"The `metai` console script end to end: run the installed script in a subprocess, as a user would."
import io, os, random, shutil, signal, subprocess, sys, json, threading
from pathlib import Path
import pytest

from metai.cli import COMMANDS

ROOT = Path(__file__).resolve().parent.parent

def _script():
    p = Path(sys.executable).parent/'metai'
    return str(p) if p.exists() else shutil.which('metai')

METAI = _script()

def metai(*args, env=None, cwd=None, timeout=300, input=None):
    "Run the installed `metai` script (with `input` on its stdin); returns (exit code, stdout, stderr)."
    assert METAI, 'the metai console script is not installed: pip install -e .'
    e = dict(os.environ, OMP_NUM_THREADS='1'); e.pop('METAI_DEBUG', None); e.update(env or {})
    r = subprocess.run([METAI, *map(str, args)], capture_output=True, text=True, env=e, cwd=cwd, timeout=timeout, input=input)
    return r.returncode, r.stdout, r.stderr

@pytest.fixture
def metai_here(capsys, monkeypatch):
    "`metai ARGS` in this process: the same `main()` as the script, without starting Python (for the many quick refusals)."
    from metai.cli import main
    monkeypatch.delenv('METAI_DEBUG', raising=False)
    def run(*args, input=''):
        monkeypatch.setattr(sys, 'stdin', io.StringIO(input))
        try: rc = main([str(a) for a in args])
        except SystemExit as e: rc = e.code
        r = capsys.readouterr(); return rc, r.out, r.err
    return run

def one_line(err):
    "stderr is exactly one line, with no traceback."
    assert err.endswith('\n') and err.count('\n') == 1, repr(err)
    assert 'Traceback' not in err
    return err.strip()

# --- help ---------------------------------------------------------------------------------------------------------

def test_help_lists_every_command():
    rc, out, err = metai('--help')
    assert rc == 0 and err == ''
    assert out.startswith('usage: metai <command>')
    for name, f in COMMANDS.items():
        line = next(l for l in out.splitlines() if l.strip().startswith(name + ' '))
        assert f.__doc__.split('\n')[0].strip() in line, line
    assert metai() == (0, out, '')          # bare `metai` shows the same help
    assert metai('-h')[1] == out

def test_version():
    import metai as pkg
    assert metai('--version') == (0, f'metai {pkg.__version__}\n', '')

@pytest.mark.parametrize('name', list(COMMANDS))
def test_command_help(name):
    rc, out, err = metai(name, '--help')
    assert rc == 0 and err == '', err
    assert out.startswith(f'usage: metai {name}')
    assert COMMANDS[name].__doc__.split('\n')[0].strip()[:40] in ' '.join(out.split())
    assert metai('help', name) == (rc, out, err)

def test_prepare_data_help_has_every_flag():
    rc, out, err = metai('prepare-data', '--help')
    for flag in ['--chinese-path', '--english-path', '--out-dir', '--vocab-size', '--zh-ratio', '--val-fraction',
                 '--workers', '--seed', '--skip-bad', '--tokenizer-path']: assert flag in out, flag
    assert '(default: data/build)' in out and '(default: 8192)' in out

# --- usage errors: one line, exit code 2 ---------------------------------------------------------------------------

def test_unknown_command():
    rc, out, err = metai('frobnicate')
    assert rc == 2 and out == ''
    assert one_line(err) == "metai: unknown command 'frobnicate' (see metai --help)"
    rc, out, err = metai('prepare-dat')
    assert rc == 2 and "did you mean 'prepare-data'" in one_line(err)
    rc, out, err = metai('--frobnicate')
    assert rc == 2 and "unknown option '--frobnicate'" in one_line(err)

def test_bad_flag():
    rc, out, err = metai('prepare-data', '--no-such-flag')
    assert rc == 2 and out == ''
    assert one_line(err).startswith("metai prepare-data: error: unrecognized argument '--no-such-flag'")
    rc, out, err = metai('prepare-data', '--vocab', '512')          # no prefix matching, a suggestion instead
    assert rc == 2 and "did you mean '--vocab-size'" in one_line(err)

def test_bad_value():
    rc, out, err = metai('prepare-data', '--vocab-size', 'big')
    assert rc == 2 and out == ''
    assert "argument --vocab-size: invalid int value: 'big'" in one_line(err)
    rc, out, err = metai('prepare-data', '--zh-ratio')                # missing value
    assert rc == 2 and '--zh-ratio' in one_line(err)

# --- config ---------------------------------------------------------------------------------------------------------

def test_config_deepseek_v3_numbers():
    rc, out, err = metai('config', 'deepseek-v3', '--json')
    assert rc == 0 and err == '', err
    r = json.loads(out)
    assert (r['params'], r['active_params'], r['mtp_params'], r['hub_params']) == \
           (671_026_419_200, 37_552_297_472, 11_610_068_224, 684_489_845_504)
    assert r['kv_elems_per_token_per_layer'] == 576
    rc, out, err = metai('config', 'deepseek-v3')
    assert rc == 0 and '671,026,419,200' in out and '37,552,297,472' in out

def test_config_from_json_and_bad_input(tmp_path):
    from metai.config import ModelConfig
    cfg = ModelConfig.preset('micro'); cfg.to_json(tmp_path)
    rc, out, err = metai('config', tmp_path, '--json')
    assert rc == 0 and json.loads(out)['params'] == cfg.num_params()
    rc, out, err = metai('config', 'no-such-preset')
    assert rc == 2 and one_line(err).startswith("metai config: error: argument preset: unknown preset 'no-such-preset'")
    bad = tmp_path/'broken.json'; bad.write_text('{"dim": 256,\n "n_heads": ')
    rc, out, err = metai('config', bad)
    assert rc == 1 and one_line(err).startswith(f'metai config: error: {bad}:'), err
    rc, out, err = metai('config', tmp_path/'missing.json')
    assert rc == 1 and 'missing.json' in one_line(err)
    rc, out, err = metai('config', 'micro', '--seq-len', '0')
    assert rc == 2 and '--seq-len' in one_line(err)

# --- prepare-data end to end ----------------------------------------------------------------------------------------

ZH = '的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处理府研质'
EN = 'the of and to in is that it was for on are as with his they at be this from have or by one had not but what all were when we there can an your which their said if do will each about how up out them then she many some so these would other into has more her two like him see time could no make than first been its who now people my made over did down only way find use may water long little very after words called just where most know'.split()

def write_corpus(d:Path, n_docs:int=150, seed:int=0):
    "A small generated bilingual corpus: Chinese and English documents separated by blank lines."
    rng = random.Random(seed)
    zh = '\n\n'.join(''.join(rng.choice(ZH) for _ in range(rng.randint(20, 80))) + '。' for _ in range(n_docs))
    en = '\n\n'.join(' '.join(rng.choice(EN) for _ in range(rng.randint(10, 40))).capitalize() + '.' for _ in range(n_docs))
    (d/'zh.txt').write_text(zh + '\n', encoding='utf-8'); (d/'en.txt').write_text(en + '\n', encoding='utf-8')
    return d/'zh.txt', d/'en.txt'

def test_prepare_data_tiny_corpus(tmp_path):
    zh, en = write_corpus(tmp_path)
    out_dir = tmp_path/'build'
    rc, out, err = metai('prepare-data', '--chinese-path', zh, '--english-path', en, '--out-dir', out_dir,
                         '--vocab-size', 1024, '--workers', 1)
    assert rc == 0, err
    meta = json.loads((out_dir/'meta.json').read_text(encoding='utf-8'))
    assert f'prepare-data -> {out_dir}\n' in out, out                         # the report
    assert f"total: {meta['tokens']:,} tokens, {meta['docs']:,} docs" in out, out
    assert 'MB/s' in out
    assert meta['docs'] == 300 and meta['tokenizer']['vocab_size'] == 1024
    assert (out_dir/'tokenizer.model').is_file() and (out_dir/'train.bin').stat().st_size > 0
    rc, out2, err = metai('prepare-data', '--chinese-path', zh, '--english-path', en, '--out-dir', out_dir,
                          '--vocab-size', 1024, '--workers', 1)
    assert rc == 0 and '(reused)' in out2, out2                               # same inputs: nothing rebuilt

def test_prepare_data_missing_file(tmp_path):
    _, en = write_corpus(tmp_path, n_docs=5)
    missing = tmp_path/'no_such_corpus.txt'
    rc, out, err = metai('prepare-data', '--chinese-path', missing, '--english-path', en, '--out-dir', tmp_path/'b')
    assert rc == 1, (out, err)
    msg = one_line(err)
    assert msg.startswith('metai prepare-data: error: ') and 'no_such_corpus.txt' in msg, msg
    assert not (tmp_path/'b'/'meta.json').exists()

def test_prepare_data_invalid_utf8(tmp_path):
    zh, en = write_corpus(tmp_path, n_docs=20)
    bad = tmp_path/'bad_zh.txt'
    bad.write_bytes(zh.read_bytes() + b'\n\n\xff\xfe not utf-8\n')
    rc, out, err = metai('prepare-data', '--chinese-path', bad, '--english-path', en, '--out-dir', tmp_path/'b',
                         '--vocab-size', 512, '--workers', 1)
    assert rc == 1, (out, err)
    msg = one_line(err)
    assert msg.startswith('metai prepare-data: error: ') and 'bad_zh.txt' in msg, msg
    assert not (tmp_path/'b'/'meta.json').exists()

def test_debug_shows_traceback(tmp_path):
    _, en = write_corpus(tmp_path, n_docs=5)
    rc, out, err = metai('prepare-data', '--chinese-path', tmp_path/'missing.txt', '--english-path', en,
                         '--out-dir', tmp_path/'b', env={'METAI_DEBUG': '1'})
    assert rc == 1 and 'Traceback' in err and 'missing.txt' in err

def test_ctrl_c_exits_130(tmp_path):
    "SIGINT while prepare-data waits on its input (a FIFO nobody writes to): a one-line message and exit code 130."
    fifo = tmp_path/'zh.txt'; os.mkfifo(fifo)
    e = dict(os.environ, OMP_NUM_THREADS='1'); e.pop('METAI_DEBUG', None)
    p = subprocess.Popen([METAI, 'prepare-data', '--chinese-path', str(fifo), '--out-dir', str(tmp_path/'b')],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    fds = []
    t = threading.Thread(target=lambda: fds.append(os.open(fifo, os.O_WRONLY)), daemon=True)  # returns once metai opens it
    t.start(); t.join(timeout=120)
    try:
        assert fds, 'metai never opened its input'
        # a process-wide SIGINT may land on a thread other than the main one, which then stays blocked in read() until the
        # next signal (a terminal user presses Ctrl-C again): send it again every few seconds, for up to a minute
        for _ in range(20):
            p.send_signal(signal.SIGINT)
            try: out, err = p.communicate(timeout=3); break
            except subprocess.TimeoutExpired: pass
        else: raise AssertionError('metai prepare-data did not stop on SIGINT within a minute')
    finally:
        if p.poll() is None: p.kill()
        for fd in fds: os.close(fd)
    assert p.returncode == 130, (p.returncode, err)
    assert one_line(err) == 'metai prepare-data: interrupted'

# --- generate, chat, quantize on a tiny trained checkpoint ---------------------------------------------------------

PHRASES = ['the cat sat on the mat.', 'a bird in the hand is worth two in the bush.', 'all that glitters is not gold.',
           'the early bird catches the worm.', 'actions speak louder than words.', 'time and tide wait for no man.']
POEM = ['床前明月光，疑是地上霜。', '举头望明月，低头思故乡。', '春眠不觉晓，处处闻啼鸟。', '夜来风雨声，花落知多少。']

@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    "A 2-layer model of width 64 trained for 30 steps by `metai train-custom` on a generated bilingual corpus."
    d = tmp_path_factory.mktemp('tiny_run')
    rng = random.Random(0)
    for name, lines, n, sep in (('zh', POEM, 200, ''), ('en', PHRASES, 400, ' ')):
        docs = [sep.join(rng.choice(lines) for _ in range(rng.randint(2, 5))) for _ in range(n)]
        (d/f'{name}.txt').write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
    rc, out, err = metai('train-custom', '--chinese-path', d/'zh.txt', '--english-path', d/'en.txt', '--output-dir', d/'run',
                         '--vocab-size', 512, '--hidden-dim', 64, '--num-layers', 2, '--num-heads', 4, '--num-kv-heads', 2,
                         '--mlp-dim', 128, '--seq-len', 64, '--max-seq-len', 128, '--batch-size', 8, '--steps', 30, '--warmup', 3,
                         '--lr', 3e-3, '--eval-interval', 30, '--device', 'cpu', '--sample-prompt', '', env={'METAI_PLAIN': '1'})
    assert rc == 0, err
    return d/'run'

def test_generate_streams_a_continuation(tiny_run):
    args = ('generate', '--model-dir', tiny_run, '--prompt', 'the cat', '--max-new-tokens', 24, '--device', 'cpu')
    rc, out, err = metai(*args)
    assert (rc, err) == (0, ''), err
    assert out.startswith('the cat') and out.endswith('\n') and len(out.strip()) > len('the cat'), repr(out)
    assert metai(*args)[1] == out                                           # seeded: the same text again
    rc, greedy, err = metai(*args, '--temperature', 0)
    from metai.infer.generate import load_model_dir, encode_prompt, generate
    model, tok = load_model_dir(tiny_run, 'cpu')                            # the library's own greedy output
    assert greedy == 'the cat' + tok.decode(generate(model, encode_prompt(tok, 'the cat'), 24, temperature=0, eos_id=tok.eos_id)) + '\n'

def test_generate_sampling_flags_and_stop(tiny_run):
    base = ('generate', '--model-dir', tiny_run, '--prompt', 'the', '--max-new-tokens', 40, '--device', 'cpu')
    rc, full, err = metai(*base, '--temperature', 0)
    assert rc == 0, err
    cont = full[len('the'):-1]
    stop = next((w for w in ('.', ' ') if w in cont), None)
    assert stop, repr(full)
    rc, out, err = metai(*base, '--temperature', 0, '--stop', 'zzz-never', '--stop', stop)              # repeated
    assert rc == 0 and out == 'the' + cont[:cont.index(stop)] + '\n', (out, full)                      # cut before the stop string
    rc, out, err = metai(*base, '--temperature', 0, '--stop', f'qqq,{stop}')   # one value is one string, its comma included
    assert rc == 0 and out == full, (out, full)
    rc, out, err = metai(*base, '--top-k', 5, '--top-p', 0.8, '--repetition-penalty', 1.3, '--seed', 3)
    assert rc == 0 and out.startswith('the'), err

def test_generate_bad_input(tiny_run, tmp_path):
    rc, out, err = metai('generate', '--model-dir', tmp_path/'nowhere', '--prompt', 'hi', '--device', 'cpu')
    assert rc == 1 and one_line(err) == f'metai generate: error: {tmp_path}/nowhere: no such model directory'
    rc, out, err = metai('generate', '--model-dir', tiny_run, '--prompt', ' ', '--device', 'cpu')
    assert rc == 1 and one_line(err) == 'metai generate: error: prompt: empty'
    rc, out, err = metai('generate', '--model-dir', tiny_run, '--prompt', 'the cat sat on the mat. ' * 40, '--device', 'cpu')
    assert rc == 1 and 'do not fit the context of 128 tokens' in one_line(err), err
    rc, out, err = metai('generate', '--model-dir', tiny_run, '--prompt', 'hi', '--top-p', 0)
    assert rc == 2 and '--top-p' in one_line(err)
    rc, out, err = metai('generate', '--prompt', 'hi')
    assert rc == 2 and '--model-dir' in one_line(err)
    d = tmp_path/'notok'; d.mkdir()
    for f in ('config.json', 'model.safetensors'): shutil.copy(tiny_run/f, d/f)
    rc, out, err = metai('generate', '--model-dir', d, '--prompt', 'hi', '--device', 'cpu')
    assert rc == 1 and one_line(err).startswith(f'metai generate: error: {d}/tokenizer.model: missing'), err

def test_generate_and_chat_flag_errors(tiny_run, tmp_path, metai_here):
    "Values no run could use are refused before the model loads: one line, exit 2 (or 1 for a device this machine lacks)."
    base = ('generate', '--model-dir', tiny_run, '--prompt', 'the', '--max-new-tokens', 4)
    for extra, flag in ((('--temperature', 'nan'), '--temperature'), (('--temperature', 'inf'), '--temperature'),
                        (('--repetition-penalty', 'nan'), '--repetition-penalty'), (('--top-p', 'nan'), '--top-p'),
                        (('--seed', 2**70), '--seed'), (('--seed', -1), '--seed'), (('--stop', ''), '--stop'),
                        (('--device', 'gpu'), '--device'), (('--device', 'cuda:x'), '--device')):
        rc, out, err = metai_here(*base, *extra)
        assert rc == 2 and flag in one_line(err) and out == '', (extra, rc, err)
        if flag != '--stop':
            rc, out, err = metai_here('chat', '--model-dir', tiny_run, *extra, input='hi\n')
            assert rc == 2 and flag in one_line(err), (extra, rc, err)
    import torch
    if not torch.cuda.is_available():
        rc, out, err = metai(*base, '--device', 'cuda')
        assert rc == 1 and one_line(err) == 'metai generate: error: --device cuda: CUDA is not available on this machine', err
    rc, out, err = metai('chat', '--model-dir', tiny_run, '--system', 'the cat sat on the mat. ' * 40, '--device', 'cpu', input='hi\n')
    assert rc == 1 and one_line(err).startswith('metai chat: error: system: the system message takes'), err

def test_padded_vocabulary_prints_replacement_characters(tiny_run, tmp_path):
    "A model with more vocabulary rows than its tokenizer has tokens (a padded vocabulary) generates; those ids print as U+FFFD."
    import dataclasses, torch
    from safetensors.torch import save_model
    from metai.infer.generate import load_model_dir
    from metai.model.transformer import Transformer
    model, tok = load_model_dir(tiny_run, 'cpu')
    cfg = dataclasses.replace(model.cfg, vocab_size=model.cfg.vocab_size + 64)
    big = Transformer(cfg).eval()
    sd = {k: v for k, v in model.state_dict().items()}
    for k in ('embed.weight', 'head.weight'):
        w = big.state_dict()[k].clone(); w[:model.cfg.vocab_size] = sd[k]; w[model.cfg.vocab_size:] *= 50  # the padded ids win
        sd[k] = w
    big.load_state_dict(sd)
    d = tmp_path/'padded'; d.mkdir()
    cfg.to_json(d/'config.json'); save_model(big, str(d/'model.safetensors')); shutil.copy(tiny_run/'tokenizer.model', d)
    rc, out, err = metai('generate', '--model-dir', d, '--prompt', 'the', '--max-new-tokens', 8, '--temperature', 2, '--top-k', 0, '--device', 'cpu')
    assert (rc, err) == (0, '') and out.startswith('the') and '\ufffd' in out, (rc, out, err)
    rc, out, err = metai('chat', '--model-dir', d, '--max-new-tokens', 8, '--temperature', 2, '--device', 'cpu', input='hi\n')
    assert (rc, err) == (0, '') and '\ufffd' in out, (rc, out, err)

def test_export_and_import_refuse_their_own_folder(tiny_run, tmp_path):
    "`--out` equal to the folder read is refused before anything is written; export-hf of a transformers folder says what it is."
    d = tmp_path/'m'; shutil.copytree(tiny_run, d, ignore=shutil.ignore_patterns('checkpoints', 'train_state.pt', 'data'))
    before = {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}
    rc, out, err = metai('export-hf', '--model-dir', d, '--out', d)
    assert rc == 1 and one_line(err) == f'metai export-hf: error: {d}: is the folder being read; choose another --out', err
    assert {f.name: f.read_bytes() for f in d.iterdir() if f.is_file()} == before
    assert metai('export-hf', '--model-dir', d, '--out', tmp_path/'hf')[0] == 0
    hf_before = {f.name: f.read_bytes() for f in (tmp_path/'hf').iterdir()}
    rc, out, err = metai('import-hf', '--hf-dir', tmp_path/'hf', '--out', tmp_path/'hf')
    assert rc == 1 and 'is the folder being read' in one_line(err), err
    assert {f.name: f.read_bytes() for f in (tmp_path/'hf').iterdir()} == hf_before
    rc, out, err = metai('export-hf', '--model-dir', tmp_path/'hf', '--out', tmp_path/'hf2')
    assert rc == 1 and 'a Hugging Face checkpoint (config.json has model_type)' in one_line(err) and not (tmp_path/'hf2').exists(), err

def test_generate_from_exported_hf_checkpoint(tiny_run, tmp_path):
    rc, out, err = metai('export-hf', '--model-dir', tiny_run, '--out', tmp_path/'hf')
    assert rc == 0, err
    args = ('--prompt', 'the cat', '--max-new-tokens', 16, '--temperature', 0, '--device', 'cpu')
    rc, a, err = metai('generate', '--model-dir', tmp_path/'hf', *args)
    assert rc == 0 and a.startswith('the cat') and len(a) > len('the cat\n'), err
    assert metai('generate', '--model-dir', tiny_run, *args)[1] == a        # same weights, same greedy text

def test_chat_piped_session(tiny_run):
    stdin = 'the cat sat\n\nall that glitters\n/reset\nthe cat sat\n/exit\nnever read\n'
    rc, out, err = metai('chat', '--model-dir', tiny_run, '--system', 'Be brief.', '--max-new-tokens', 12,
                         '--temperature', 0, '--device', 'cpu', input=stdin)
    assert (rc, err) == (0, ''), err
    assert out.startswith(f'metai chat: {tiny_run} (') and '/reset starts over, /exit leaves' in out.splitlines()[0]
    assert out.count('user> ') == 6 and out.count('assistant> ') == 3   # the blank line gets no reply, nothing after /exit
    assert '(conversation reset)' in out and 'never read' not in out and out.endswith('user> /exit\n')
    replies = [seg.split('\nuser> ')[0] for seg in out.split('assistant> ')[1:]]
    assert replies[0] == replies[2], replies                                # after /reset the first turn comes back
    from metai.infer.generate import load_model_dir, ChatSession
    model, tok = load_model_dir(tiny_run, 'cpu')
    s = ChatSession(model, tok, system='Be brief.', max_new_tokens=12, temperature=0, top_p=0.9, seed=0)
    assert s.send('the cat sat', stream=None) == replies[0]

def test_chat_errors_and_eof(tiny_run):
    stdin = ('the cat sat on the mat. ' * 30) + '\nthe cat\n'                # too long for 128 tokens, then a good one, then EOF
    rc, out, err = metai('chat', '--model-dir', tiny_run, '--max-new-tokens', 4, '--device', 'cpu', input=stdin)
    assert rc == 0, err
    assert one_line(err).startswith('metai chat: error: conversation: ') and 'do not fit the context of 128' in err
    assert out.count('assistant> ') == 2
    rc, out, err = metai('chat', '--model-dir', tiny_run/'nowhere')
    assert rc == 1 and 'no such model directory' in one_line(err)

def test_chat_max_context(tiny_run):
    rc, out, err = metai('chat', '--model-dir', tiny_run, '--max-context', 40, '--max-new-tokens', 200, '--temperature', 0,
                         '--device', 'cpu', input='the cat\nthe cat sat on the mat\n')
    assert rc == 0 and '40 of its 128 tokens of context (--max-context)' in out.splitlines()[0], (out, err)
    assert out.count('assistant> ') == 2 and 'do not fit the context of 40' in one_line(err), err  # the first reply filled the 40
    assert 'max_context (metai chat --max-context) allows up to 128' in err, err
    for bad in (1, 129, -1):
        rc, out, err = metai('chat', '--model-dir', tiny_run, '--max-context', bad, '--device', 'cpu', input='')
        assert rc == 2 and '--max-context' in one_line(err) and out == '', (bad, out, err)

def test_quantize_then_generate(tiny_run, tmp_path):
    q = tmp_path/'q4'
    rc, out, err = metai('quantize', '--model-dir', tiny_run, '--group-size', 32, '--out', q)
    assert (rc, err) == (0, ''), err
    assert out.startswith(f'{q}: int4, group size 32,') and 'quantized weights: ' in out and 'whole model in bf16: ' in out, out
    ratio = float(out.split('bits/weight, ')[1].split('x smaller')[0])
    assert ratio > 3.0, out
    assert json.loads((q/'quant.json').read_text())['group_size'] == 32 and (q/'tokenizer.model').is_file()
    rc, out, err = metai('generate', '--model-dir', q, '--prompt', 'the cat', '--max-new-tokens', 12, '--device', 'cpu')
    assert (rc, err) == (0, '') and out.startswith('the cat') and len(out) > len('the cat\n'), err
    rc, out, err = metai('chat', '--model-dir', q, '--max-new-tokens', 6, '--device', 'cpu', input='hello\n/exit\n')
    assert rc == 0 and out.count('assistant> ') == 1, err

def test_quantize_bad_input(tiny_run, tmp_path):
    rc, out, err = metai('quantize', '--model-dir', tiny_run, '--group-size', 48, '--out', tmp_path/'q')
    assert rc == 2 and '--group-size' in one_line(err) and not (tmp_path/'q').exists()
    rc, out, err = metai('quantize', '--model-dir', tiny_run, '--method', 'int3', '--out', tmp_path/'q')
    assert rc == 2 and '--method' in one_line(err)
    rc, out, err = metai('quantize', '--model-dir', tmp_path/'nowhere', '--out', tmp_path/'q')
    assert rc == 1 and 'nowhere/config.json' in one_line(err) and not (tmp_path/'q').exists()
    rc, out, err = metai('quantize', '--model-dir', tiny_run, '--out', tiny_run)
    assert rc == 1 and 'is the folder being read' in one_line(err)

# --- speculative decoding from the command line ---------------------------------------------------------------------

def test_generate_draft_speculation_is_greedy_exact(tiny_run):
    "Greedy speculative decoding (the model drafting for itself) prints exactly the plain greedy text, plus its stats."
    base = ('generate', '--model-dir', tiny_run, '--prompt', 'the cat', '--max-new-tokens', 20, '--device', 'cpu', '--temperature', 0)
    rc, plain, err = metai(*base)
    assert rc == 0, err
    rc, spec, err = metai(*base, '--draft-model-dir', tiny_run, '--speculate-k', 3)
    assert rc == 0, err
    assert spec == plain, (spec, plain)
    assert 'accept' in err.lower(), err                     # acceptance rate reported on stderr

def test_generate_mtp_speculation(tmp_path, tiny_run):
    "A model with an MTP module (trained with self-distillation) drafts for itself; greedy output equals plain greedy."
    d = tmp_path
    rc, out, err = metai('train-custom', '--chinese-path', tiny_run.parent/'zh.txt', '--english-path', tiny_run.parent/'en.txt',
                         '--output-dir', d/'run', '--data-dir', tiny_run/'data', '--vocab-size', 512, '--hidden-dim', 64, '--num-layers', 2,
                         '--num-heads', 4, '--num-kv-heads', 2, '--mlp-dim', 128, '--mtp-depth', 1, '--mtp-distill', 2, '--seq-len', 64,
                         '--max-seq-len', 128, '--batch-size', 8, '--steps', 10, '--warmup', 2, '--eval-interval', 10, '--device', 'cpu',
                         '--sample-prompt', '', env={'METAI_PLAIN': '1'})
    assert rc == 0, err
    assert json.loads((d/'run'/'config.json').read_text())['mtp_distill'] == 2.0
    base = ('generate', '--model-dir', d/'run', '--prompt', 'the cat', '--max-new-tokens', 16, '--device', 'cpu', '--temperature', 0)
    rc, plain, err = metai(*base); assert rc == 0, err
    rc, spec, err = metai(*base, '--mtp-speculate'); assert rc == 0, err
    assert spec == plain, (spec, plain)

def test_train_sparse_attention_then_generate_and_export(tmp_path, tiny_run):
    """train-custom with DeepSeek-V3.2's lightning indexer (notebook 19): its KL is logged; greedy decoding past index_topk
    (sparse) equals the argmax of full forwards; MTP speculation equals plain greedy; transformers' DeepseekV32ForCausalLM
    reads export-hf's folder and gives the same logits."""
    import torch
    d = tmp_path
    rc, out, err = metai('train-custom', '--preset', 'ds-tiny', '--chinese-path', tiny_run.parent/'zh.txt',
                         '--english-path', tiny_run.parent/'en.txt', '--output-dir', d/'run', '--data-dir', tiny_run/'data',
                         '--vocab-size', 512, '--hidden-dim', 64, '--num-layers', 2, '--num-heads', 4, '--q-lora-rank', 32,
                         '--kv-lora-rank', 32, '--qk-nope-head-dim', 16, '--qk-rope-head-dim', 8, '--v-head-dim', 16,
                         '--mlp-dim', 128, '--n-routed-experts', 8, '--moe-ffn-dim', 32, '--n-activated-experts', 2,
                         '--mtp-depth', 1, '--mtp-distill', 2, '--index-n-heads', 2, '--index-head-dim', 16, '--index-topk', 8,
                         '--seq-len', 64, '--max-seq-len', 128, '--batch-size', 8, '--steps', 10, '--warmup', 2,
                         '--eval-interval', 10, '--log-interval', 5, '--device', 'cpu', '--sample-prompt', '', env={'METAI_PLAIN': '1'})
    assert rc == 0, err
    assert 'index ' in err + out                                                   # the log line shows the indexer's KL
    cfg = json.loads((d/'run'/'config.json').read_text())
    assert (cfg['index_n_heads'], cfg['index_head_dim'], cfg['index_topk']) == (2, 16, 8)
    recs = [json.loads(l) for l in (d/'run'/'metrics.jsonl').read_text().splitlines()]
    kl = [r['index_loss'] for r in recs if 'index_loss' in r]
    assert len(kl) == 2 and all(v >= 0 and v == v for v in kl), kl
    from metai.infer.generate import load_model_dir, encode_prompt, generate
    model, tok = load_model_dir(d/'run', 'cpu')
    prompt = 'the cat sat on the mat. all that glitters is not gold.'
    ids = encode_prompt(tok, prompt)
    assert len(ids) > 8                                                            # every decode step attends sparsely
    new = generate(model, ids, 20, temperature=0, eos_id=tok.eos_id)
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in new: seq = torch.cat([seq, model(seq)[0][:, -1:].argmax(-1)], 1)  # no cache: a full forward per token
    assert seq[0, len(ids):].tolist() == new
    base = ('generate', '--model-dir', d/'run', '--prompt', prompt, '--max-new-tokens', 20, '--device', 'cpu', '--temperature', 0)
    rc, plain, err = metai(*base); assert rc == 0, err
    assert plain == prompt + tok.decode(new) + '\n'
    rc, spec, err = metai(*base, '--mtp-speculate'); assert rc == 0, err
    assert spec == plain, (spec, plain)
    rc, out, err = metai('export-hf', '--model-dir', d/'run', '--out', d/'hf'); assert rc == 0, err
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(d/'hf').eval()
    assert type(hf).__name__ == 'DeepseekV32ForCausalLM'
    x = torch.tensor([ids])
    with torch.no_grad(): diff = (hf(input_ids=x).logits - model(x)[0]).abs().max().item()
    assert diff < 1e-4, diff
    rc, via_hf, err = metai('generate', '--model-dir', d/'hf', *base[3:])      # generate reads the transformers folder too
    assert rc == 0 and via_hf == plain, (err, via_hf, plain)

def test_speculation_flag_errors(tiny_run):
    for extra in (('--draft-model-dir', tiny_run, '--mtp-speculate'), ('--mtp-speculate', '--speculate-k', 99),
                  ('--mtp-speculate', '--repetition-penalty', 1.2)):
        rc, out, err = metai('generate', '--model-dir', tiny_run, '--prompt', 'x', '--device', 'cpu', *extra)
        assert rc == 2 and len(err.strip().splitlines()) == 1, (extra, rc, err)
    rc, out, err = metai('generate', '--model-dir', tiny_run, '--prompt', 'x', '--device', 'cpu', '--mtp-speculate')
    assert rc == 1 and out == '' and one_line(err) == (f'metai generate: error: {tiny_run}/config.json: mtp_depth=0: the model has no MTP '
                                                       'module to draft with (train one with --mtp-depth, or give --draft-model-dir)'), err
    rc, out, err = metai('generate', '--model-dir', tiny_run, '--prompt', 'x', '--device', 'cpu', '--speculate-k', 3)
    assert rc == 2 and '--speculate-k: needs a drafter' in one_line(err), err

def test_draft_with_a_shorter_context(tiny_run, tmp_path):
    "A draft whose context is shorter than the target's: a one-line warning; a prompt longer than it: an error naming the draft, before any output."
    d = tmp_path/'short'; d.mkdir()
    for f in ('model.safetensors', 'tokenizer.model'): shutil.copy(tiny_run/f, d/f)
    cfg = json.loads((tiny_run/'config.json').read_text()); cfg['max_seq_len'] = 16
    (d/'config.json').write_text(json.dumps(cfg))
    rc, out, err = metai('generate', '--model-dir', tiny_run, '--draft-model-dir', d, '--prompt', 'the cat sat on the mat. ' * 4, '--device', 'cpu')
    lines = err.strip().splitlines()
    assert rc == 1 and out == '' and len(lines) == 2 and 'Traceback' not in err, err
    assert lines[0].startswith('metai generate: warning: ') and 'is shorter than the target' in lines[0], err
    assert lines[1].startswith("metai generate: error: prompt: ") and f"the draft model's context of 16 tokens (max_seq_len in {d}/config.json)" in lines[1], err
    rc, out, err = metai('chat', '--model-dir', tiny_run, '--draft-model-dir', d, '--device', 'cpu', '--temperature', 0,
                         '--max-new-tokens', 100, input='the cat\nthe cat sat\n')
    assert rc == 0 and '16 of its 128 tokens of context (the draft model\'s context)' in out.splitlines()[0], (out, err)
    assert 'do not fit the context of 16 tokens (reset to start over)' in err and 'allows up to' not in err, err
    rc, out, err = metai('chat', '--model-dir', tiny_run, '--draft-model-dir', d, '--max-context', 40, '--device', 'cpu', input='')
    assert rc == 2 and out == '' and "--max-context: 40 is not in 2..16 (the draft model's context)" in err.splitlines()[-1], err
