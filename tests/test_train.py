"""Training from the command line, end to end in subprocesses: a run killed with SIGKILL and resumed matches an
uninterrupted one bit for bit, Ctrl-C saves and exits cleanly, bad checkpoints and bad flags get one-line errors and
leave every file as it was, and `generate` and `plot` work on the result."""
import json, math, os, random, re, shutil, signal, subprocess, sys, time
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parent.parent
METAI = str(Path(sys.executable).parent/'metai') if (Path(sys.executable).parent/'metai').exists() else shutil.which('metai')
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'METAI_PLAIN': '1'}
ENV.pop('METAI_DEBUG', None)

def metai(*args, timeout=120):
    "Run the installed `metai` script; returns (exit code, stdout, stderr)."
    assert METAI, 'the metai console script is not installed: pip install -e .'
    r = subprocess.run([METAI, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)
    return r.returncode, r.stdout, r.stderr

def one_line(err):
    "stderr is exactly one line, with no traceback."
    assert err.endswith('\n') and err.count('\n') == 1 and 'Traceback' not in err, repr(err)
    return err.strip()

# --- a tiny bilingual corpus and a tiny model ---------------------------------------------------------------------

ZH = ['床前明月光，疑是地上霜。', '举头望明月，低头思故乡。', '春眠不觉晓，处处闻啼鸟。', '夜来风雨声，花落知多少。',
      '白日依山尽，黄河入海流。', '欲穷千里目，更上一层楼。']
EN = ['the cat sat on the mat.', 'a bird in the hand is worth two in the bush.', 'all that glitters is not gold.',
      'the early bird catches the worm.', 'actions speak louder than words.', 'time and tide wait for no man.']

def write_corpus(d:Path, n_zh=300, n_en=600, seed=0):
    rng = random.Random(seed)
    for name, lines, n, sep in (('zh', ZH, n_zh, ''), ('en', EN, n_en, ' ')):
        docs = [sep.join(rng.choice(lines) for _ in range(rng.randint(2, 5))) for _ in range(n)]
        (d/f'{name}.txt').write_text('\n\n'.join(docs) + '\n', encoding='utf-8')
    return d/'zh.txt', d/'en.txt'

N, EVAL = 60, 10   # steps of every run; a checkpoint every EVAL steps

@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp('train')
    zh, en = write_corpus(d)
    return d, zh, en

def train_args(corpus, out, dim=96, *extra):
    "train-custom for a 3-layer model of width `dim` (slow enough per step to be killed mid-run), deterministic."
    d, zh, en = corpus
    return ['train-custom', '--chinese-path', zh, '--english-path', en, '--data-dir', d/'data', '--output-dir', out,
            '--vocab-size', 512, '--hidden-dim', dim, '--num-layers', 3, '--num-heads', 4, '--num-kv-heads', 2, '--mlp-dim', 256,
            '--seq-len', 128, '--batch-size', 8, '--steps', N, '--warmup', 5, '--lr', 3e-3, '--eval-interval', EVAL,
            '--log-interval', 1, '--seed', 3, '--deterministic', '--device', 'cpu', '--sample-prompt', '', *extra]

@pytest.fixture(scope='module')
def ref(corpus):
    "The uninterrupted run."
    out = corpus[0]/'ref'
    rc, o, e = metai(*train_args(corpus, out))
    assert (rc, e) == (0, ''), e
    return out

def records(out):
    return [json.loads(l) for l in open(Path(out)/'metrics.jsonl', encoding='utf-8')]

def losses(out):  # (step, loss) of every train record, (step, val_loss) of every eval
    rs = records(out)
    return [(r['step'], r['loss']) for r in rs if 'loss' in r], [(r['step'], r['val_loss']) for r in rs if 'val_loss' in r]

def start_and_wait(args, out, step):
    "Start `metai args` and return the process once metrics.jsonl shows `step` and a checkpoint exists."
    p = subprocess.Popen([METAI, *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    m, t0 = Path(out)/'metrics.jsonl', time.time()
    while time.time() - t0 < 90:
        if p.poll() is not None: break
        if m.exists() and (Path(out)/'checkpoints'/'latest').exists():
            steps = [r['step'] for r in records(out) if 'loss' in r] if m.stat().st_size else []
            if steps and steps[-1] >= step: return p
        time.sleep(0.01)
    p.kill(); p.wait()
    pytest.fail(f'run ended or stalled before step {step} (rc {p.returncode}): {p.stderr.read()}')

def snapshot(d):
    "Bytes and mtime of every file under `d`."
    return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(Path(d).rglob('*')) if f.is_file()}

# --- exact resume -------------------------------------------------------------------------------------------------

def test_sigkill_then_resume_is_bitwise_exact(corpus, ref):
    out = corpus[0]/'killed'
    p = start_and_wait(train_args(corpus, out), out, 2 * EVAL + 3)   # past the checkpoint at step 2*EVAL
    p.send_signal(signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    killed_at = max(s for s, _ in losses(out)[0])
    assert 2 * EVAL < killed_at < N, killed_at
    ck = (out/'checkpoints'/'latest').read_text().strip()
    rc, o, e = metai(*train_args(corpus, out, 96, '--resume'))
    assert (rc, e) == (0, ''), e
    assert f"resuming" in o
    (tr_ref, ev_ref), (tr, ev) = losses(ref), losses(out)
    assert tr[-1][0] == N and tr[-1] == tr_ref[-1]          # the final-step loss, bit for bit
    assert ev[-1] == ev_ref[-1]                              # the final validation loss, bit for bit
    assert tr == tr_ref and ev == ev_ref, f'resumed from {ck}'  # and every step on the way

def test_sigint_saves_and_resumes(corpus, ref):
    out = corpus[0]/'interrupted'
    p = start_and_wait(train_args(corpus, out), out, EVAL + 3)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130, (p.returncode, err)
    line = one_line(err)
    stopped = int(line.split('interrupted (SIGINT) at step ')[1].split(':')[0])
    assert EVAL < stopped < N and '--resume' in line, line
    assert (out/'checkpoints'/'latest').read_text().strip() == f'step_{stopped:07d}'   # saved where it stopped
    rc, o, e = metai(*train_args(corpus, out, 96, '--resume'))
    assert (rc, e) == (0, ''), e
    (tr_ref, ev_ref), (tr, ev) = losses(ref), losses(out)
    assert tr == tr_ref                                      # every step's loss, bit for bit
    assert [r for r in ev if r[0] != stopped] == ev_ref      # the evals too; plus the one Ctrl-C made at `stopped`

def test_sigterm_saves_and_exits_143(corpus, ref):
    "SIGTERM (a scheduler pre-empting the job) saves a checkpoint at the step it arrived and exits with 143."
    out = corpus[0]/'preempted'
    p = start_and_wait(train_args(corpus, out), out, EVAL + 3)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143, (p.returncode, err)
    line = one_line(err)
    stopped = int(line.split('interrupted (SIGTERM) at step ')[1].split(':')[0])
    assert (out/'checkpoints'/'latest').read_text().strip() == f'step_{stopped:07d}'

# --- bad input: one line, exit code 1, nothing overwritten ----------------------------------------------------------

def test_resume_with_another_model_is_refused(corpus, ref):
    before = snapshot(ref)
    rc, o, e = metai(*train_args(corpus, ref, 128, '--resume'))
    msg = one_line(e)
    assert rc == 1 and 'dim=96' in msg and 'dim=128' in msg, msg
    rc, o, e = metai(*train_args(corpus, ref, 96, '--resume', '--vocab-size', 600))
    assert rc == 1 and 'vocab_size=512' in one_line(e), e
    assert snapshot(ref) == before

def test_existing_checkpoint_without_resume_is_refused(corpus, ref):
    before = snapshot(ref)
    rc, o, e = metai(*train_args(corpus, ref))
    msg = one_line(e)
    assert rc == 1 and 'already holds a checkpoint' in msg and '--resume' in msg, msg
    assert snapshot(ref) == before

@pytest.mark.parametrize('extra, expect', [
    (('--batch-size', 4), 'the checkpoint was trained with --batch-size 8 x --grad-accum 1 = 8 windows per step, this run asks for 4 x 1 = 4'),
    (('--grad-accum', 2), 'the checkpoint was trained with --batch-size 8 x --grad-accum 1 = 8 windows per step, this run asks for 8 x 2 = 16'),
    (('--seq-len', 64), 'the checkpoint was trained with --seq-len 128, this run asks for --seq-len 64')])
def test_resume_with_another_batch_geometry_is_refused(corpus, ref, extra, expect):
    "A resume keeps the checkpoint's sequence length and windows per step: one line naming the flags and both values."
    before = snapshot(ref)
    rc, o, e = metai(*train_args(corpus, ref, 96, '--resume', '--steps', N + 10, *extra))
    msg = one_line(e)
    assert rc == 1 and 'train_config.json: ' + expect in msg, msg
    assert snapshot(ref) == before

def test_resume_trading_batch_size_for_accumulation(corpus, ref, tmp_path):
    "8 windows per step as 4 x 2 after 8 x 1: the same windows in every step and the same validation set, so the same losses to rounding."
    runs = {}
    for name, extra in (('same', ()), ('traded', ('--batch-size', 4, '--grad-accum', 2))):
        out = tmp_path/name; shutil.copytree(ref, out)
        rc, o, e = metai(*train_args(corpus, out, 96, '--resume', '--steps', N + EVAL, *extra))
        assert (rc, e) == (0, ''), e
        runs[name] = losses(out)
    (tr_a, va_a), (tr_b, va_b) = runs['same'], runs['traded']
    assert [s for s, _ in tr_a] == [s for s, _ in tr_b] and tr_a[-1][0] == N + EVAL and va_a[-1][0] == va_b[-1][0] == N + EVAL
    assert max(abs(a - b) for (_, a), (_, b) in zip(tr_a, tr_b)) < 1e-4, (tr_a[-EVAL:], tr_b[-EVAL:])
    assert abs(va_a[-1][1] - va_b[-1][1]) < 1e-4, (va_a[-1], va_b[-1])
    cfgs = [json.loads((ck/(ck/'latest').read_text().strip()/'train_config.json').read_text())
            for ck in (tmp_path/'same'/'checkpoints', tmp_path/'traded'/'checkpoints')]
    assert cfgs[0]['eval_windows'] == cfgs[1]['eval_windows'] > 0 and cfgs[1]['batch_size'] == 4

def test_batch_sizes_that_cannot_fit_are_one_line(corpus, ref, tmp_path):
    "A batch whose logits alone exceed the machine's memory, or that holds more windows than the data: refused, naming --batch-size."
    data = corpus[0]/'data'; before = snapshot(data)
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--batch-size', 10**12))
    msg = one_line(e)
    assert rc == 1 and '--batch-size 1000000000000 x --seq-len 128: the logits of one micro-batch alone would take' in msg, msg
    assert not (tmp_path/'x').exists() and snapshot(data) == before          # refused before the data are touched
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--batch-size', 3000))   # 786 MB of logits: fits, but the data make fewer windows
    msg = one_line(e)
    assert rc == 1 and msg.startswith('metai train-custom: error: --batch-size 3000: a micro-batch would hold every one of the ') and \
        'windows of 128 tokens (--seq-len)' in msg, msg
    assert not (tmp_path/'x'/'metrics.jsonl').exists() and not (tmp_path/'x'/'checkpoints').exists()
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--num-layers', 10**6))   # 1.5 TiB of training state
    msg = one_line(e)
    assert rc == 1 and 'error: model: training 101.57B parameters (vocab_size=512, dim=96, ' in msg and 'n_layers=1000000) takes 16 bytes each' in msg, msg
    assert not (tmp_path/'x').exists() and snapshot(data) == before

def test_validation_set_is_at_most_the_split(corpus, tmp_path):
    "A huge --eval-batches evaluates every validation window once, says so, and records that count for a resume."
    out = tmp_path/'v'
    rc, o, e = metai(*train_args(corpus, out, 32, '--steps', 2, '--eval-interval', 2, '--eval-batches', 10**9))
    assert (rc, e) == (0, ''), e
    m = re.search(r'validation: the whole split, ([\d,]+) windows of 128 tokens \(--eval-batches x --batch-size asks for 8,000,000,000\)', o)
    assert m, o[-2000:]
    tc = json.loads((latest(out)/'train_config.json').read_text())
    assert tc['eval_windows'] == int(m.group(1).replace(',', '')) > 0

def oom_at_first_step(error):
    "A Transformer whose training forward raises `error`, as an allocation that fails would."
    from metai.model.transformer import Transformer
    class Oom(Transformer):
        def forward(self, tokens, targets=None, **kw):
            if targets is not None and self.training: raise error
            return super().forward(tokens, targets, **kw)
    return Oom

@pytest.mark.parametrize('error, detail', [
    (torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB is free.'),
     '(CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.20 GiB is free.)'),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 819200000 bytes."),
     "(DefaultCPUAllocator: can't allocate memory: you tried to allocate 819200000 bytes.)"),
    (MemoryError(), '(MemoryError)')])
def test_out_of_memory_in_a_step_is_one_line(corpus, tmp_path, monkeypatch, capsys, error, detail):
    "Running out of memory in a step: one line naming --batch-size and --seq-len, exit code 1; any other RuntimeError stays a bug."
    import metai.train.loop as loop
    from metai.cli import main
    monkeypatch.setenv('METAI_PLAIN', '1'); monkeypatch.delenv('METAI_DEBUG', raising=False)
    monkeypatch.setattr(loop, 'Transformer', oom_at_first_step(error))
    rc = main([str(a) for a in train_args(corpus, tmp_path/'x', 64)])
    msg = one_line(capsys.readouterr().err)
    assert rc == 1 and msg == ('metai train-custom: error: out of memory in the first step on cpu with --batch-size 8 x --seq-len 128: '
                               f'lower --batch-size or --seq-len (a larger --grad-accum keeps the tokens per step) {detail}'), msg
    monkeypatch.setattr(loop, 'Transformer', oom_at_first_step(RuntimeError('mat1 and mat2 shapes cannot be multiplied')))
    with pytest.raises(RuntimeError, match='mat1 and mat2'): main([str(a) for a in train_args(corpus, tmp_path/'y', 64)])

@pytest.fixture
def run_copy(ref, tmp_path):
    "A copy of the finished run (hard links become separate files) to damage."
    d = tmp_path/'copy'; shutil.copytree(ref, d)
    return d

def latest(run): return run/'checkpoints'/(run/'checkpoints'/'latest').read_text().strip()

def test_truncated_weights(corpus, run_copy):
    ck = latest(run_copy)
    for f in (ck/'model.safetensors', run_copy/'model.safetensors'):
        data = f.read_bytes(); f.write_bytes(data[:len(data) // 2])
    before = snapshot(run_copy)
    rc, o, e = metai(*train_args(corpus, run_copy, 96, '--resume', '--steps', N + 10))
    msg = one_line(e)
    assert rc == 1 and 'model.safetensors' in msg and 'unreadable' in msg, msg
    rc, o, e = metai('generate', '--model-dir', run_copy, '--prompt', 'the cat', '--device', 'cpu')
    assert rc == 1 and 'model.safetensors' in one_line(e), e
    assert snapshot(run_copy) == before

class Evil:
    def __init__(self, target): self.target = target
    def __reduce__(self): return (os.system, (f'touch {self.target}',))

def test_pickled_object_in_train_state_is_refused(corpus, run_copy, tmp_path):
    pwned = tmp_path/'pwned'
    st = torch.load(latest(run_copy)/'train_state.pt', weights_only=True)
    torch.save({**st, 'extra': Evil(pwned)}, latest(run_copy)/'train_state.pt')
    before = snapshot(run_copy)
    rc, o, e = metai(*train_args(corpus, run_copy, 96, '--resume', '--steps', N + 10))
    msg = one_line(e)
    assert rc == 1 and 'train_state.pt' in msg and 'not a plain training state' in msg, msg
    assert not pwned.exists()
    assert snapshot(run_copy) == before

def test_bad_training_flags(corpus, tmp_path):
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--schedule', 'linear'))
    assert rc == 2 and '--schedule' in one_line(e)
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--num-heads', 5))
    assert rc == 1 and 'n_heads=5' in one_line(e)
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--lr', 'nan'))
    assert rc == 2 and '--lr: must be a finite number, got nan' in one_line(e)
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--resume'))
    assert rc == 1 and 'no checkpoint to resume' in one_line(e)
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--compile', '--compile-mode', 'fastest'))
    assert rc == 2 and '--compile-mode' in one_line(e) and 'fastest' in e
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--compile', '--compile-mode', 'reduce-overhead', '--grad-accum', 2))
    assert rc == 2 and '--compile-mode' in one_line(e) and '--grad-accum 1' in e
    assert not (tmp_path/'x').exists()   # nothing was written for a run that never started

def test_flags_checked_before_the_data_are_built(corpus, tmp_path):
    "A --seq-len past the model's context, a negative --seed, an empty path, an --output-dir that is a file: refused first."
    for extra, code, what in ((('--seq-len', 4096, '--max-seq-len', 256), 2, '--seq-len: 4096 is longer'), (('--seed', -1), 2, '--seed'),
                              (('--chinese-path', ''), 2, '--chinese-path: must not be empty')):
        rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, *extra))
        assert rc == code and what in one_line(e), (extra, e)
    (tmp_path/'afile').write_text('x')
    rc, o, e = metai(*train_args(corpus, tmp_path/'afile', 96))
    assert rc == 1 and one_line(e).endswith('afile: --output-dir is a file, not a folder'), e
    assert not (tmp_path/'x').exists()

def test_compile_failure_is_one_line(corpus, tmp_path):
    "torch.compile failing (here: no C++ compiler for inductor's CPU code) ends the run with one line, not its long traceback."
    env = {**ENV, 'CXX': str(tmp_path/'no-such-g++')}
    r = subprocess.run([METAI, *map(str, train_args(corpus, tmp_path/'x', 96, '--compile', '--steps', 2))], capture_output=True, text=True,
                       env=env, timeout=300)
    msg = one_line(r.stderr)
    assert r.returncode == 1 and msg.startswith('metai train-custom: error: compiling failed (') and 'without --compile' in msg, msg

def bad_state(run, **change):
    "Rewrite the newest checkpoint's train_state.pt (a plain dict of tensors and numbers: it loads with weights_only=True)."
    f = latest(run)/'train_state.pt'
    st = torch.load(f, weights_only=True); st.update(change)
    for k in [k for k, v in change.items() if v is None]: del st[k]
    torch.save(st, f)

@pytest.mark.parametrize('change, what', [(dict(optimizer=None), "missing 'optimizer'"), (dict(step=-5), 'step -5'),
                                          (dict(rng_cpu=[1, 2]), "'rng_cpu' is a list"), (dict(data={}), 'does not fit this run')])
def test_train_state_that_loads_but_is_not_this_runs(corpus, run_copy, change, what):
    "A train_state.pt that unpickles safely but holds the wrong things: one line naming the file, every file as it was."
    bad_state(run_copy, **change)
    before = snapshot(run_copy)
    rc, o, e = metai(*train_args(corpus, run_copy, 96, '--resume', '--steps', N + 10))
    msg = one_line(e)
    assert rc == 1 and 'train_state.pt: ' in msg and what in msg, msg
    assert snapshot(run_copy) == before

def test_checkpoint_folders_are_model_folders_and_latest_is_found_without_its_pointer(corpus, run_copy, tmp_path):
    "Each checkpoint folder holds the tokenizer (generate loads it); without `latest` the newest complete one resumes."
    ck = latest(run_copy)
    assert (ck/'tokenizer.model').read_bytes() == (run_copy/'tokenizer.model').read_bytes()
    rc, o, e = metai('generate', '--model-dir', ck, '--prompt', 'the cat', '--max-new-tokens', 4, '--device', 'cpu')
    assert (rc, e) == (0, '') and o.startswith('the cat'), e
    (run_copy/'checkpoints'/'latest').unlink()
    for f in ('config.json', 'model.safetensors', 'train_state.pt', 'train_config.json'): (run_copy/f).unlink()
    (run_copy/'.model.safetensors.tmp12345').write_bytes(b'left by a killed run')
    rc, o, e = metai(*train_args(corpus, run_copy, 96, '--resume', '--steps', N + 1))
    assert (rc, e) == (0, ''), e
    assert losses(run_copy)[0][-1][0] == N + 1 and not (run_copy/'.model.safetensors.tmp12345').exists()

def test_resume_with_another_corpus_leaves_the_data_alone(corpus, run_copy, tmp_path):
    "The corpus a run was started on is the one it resumes on: other files are refused before the token files are touched."
    d, zh, en = corpus
    other = tmp_path/'other'; other.mkdir(); zh2, en2 = write_corpus(other, seed=1)
    data = d/'data'; before = snapshot(data)
    args = train_args(corpus, run_copy, 96, '--resume', '--steps', N + 10)
    args[args.index('--english-path') + 1] = en2
    rc, o, e = metai(*args)
    msg = one_line(e)
    assert rc == 1 and 'holds token files built from other corpus files or settings' in msg, msg
    assert snapshot(data) == before

def test_checkpoint_write_failure_is_one_line(corpus, tmp_path, monkeypatch):
    "A checkpoint that cannot be written (a full disk: torch.save raises RuntimeError): OSError naming it, no temporary folder left."
    from metai.train import loop
    from metai.config import ModelConfig
    from metai.model.transformer import Transformer
    cfg = ModelConfig.preset('micro', dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, vocab_size=64, max_seq_len=16)
    tc = loop.TrainConfig(out_dir=str(tmp_path/'run'), data_dir='', max_steps=1)
    st = dict(step=3, optimizer={}, data={}, rng_cpu=torch.get_rng_state(), rng_py=list(random.getstate()))
    good = loop.save_checkpoint(tc.out_dir, Transformer(cfg), cfg, tc, st)
    def full(*a, **k): raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 8406400 vs 8406288')
    monkeypatch.setattr(loop.torch, 'save', full)
    with pytest.raises(OSError, match=r'step_0000004: checkpoint not written \(RuntimeError: .*unexpected pos.*\); the previous checkpoint is intact'):
        loop.save_checkpoint(tc.out_dir, Transformer(cfg), cfg, tc, dict(st, step=4))
    assert os.listdir(tmp_path/'run'/'checkpoints') == ['latest', 'step_0000003'] or sorted(os.listdir(tmp_path/'run'/'checkpoints')) == ['latest', 'step_0000003']
    assert loop.latest_checkpoint(tc.out_dir) == good

# --- using the run ----------------------------------------------------------------------------------------------------

def test_generate_and_plot(ref, tmp_path):
    rc, o, e = metai('generate', '--model-dir', ref, '--prompt', 'the cat', '--max-new-tokens', 20, '--device', 'cpu')
    assert (rc, e) == (0, '') and o.startswith('the cat') and len(o) > len('the cat\n')
    rc, o, e = metai('generate', '--model-dir', tmp_path/'missing', '--prompt', 'the cat')
    assert rc == 1 and 'no such model directory' in one_line(e)
    rc, o, e = metai('generate', '--model-dir', ref, '--prompt', '')
    assert rc == 1 and one_line(e) == 'metai generate: error: prompt: empty'
    png = tmp_path/'curves.png'
    rc, o, e = metai('plot', ref, '--out', png)
    assert (rc, o, e) == (0, f'{png}\n', '') and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

def test_plot_out_is_a_file_or_a_folder(ref, tmp_path, capsys):
    "--out names the PNG, or an existing folder that receives loss.png (like cp's target); a folder that is not there is one line."
    from metai.cli import main
    def metai(*args):  # in this process: the same main() as the script, without starting Python each time
        rc = main([str(a) for a in args]); r = capsys.readouterr(); return rc, r.out, r.err
    rc, o, e = metai('plot', ref, '--out', f'{tmp_path}/')
    assert (rc, o, e) == (0, f'{tmp_path}/loss.png\n', '') and (tmp_path/'loss.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    (tmp_path/'plots').mkdir()
    assert metai('plot', ref, '--out', tmp_path/'plots') == (0, f"{tmp_path/'plots'/'loss.png'}\n", '')
    rc, o, e = metai('plot', ref, '--out', f'{tmp_path}/new/')
    assert rc == 1 and one_line(e) == f'metai plot: error: {tmp_path}/new/: no such folder', e
    rc, o, e = metai('plot', ref, '--out', tmp_path/'no'/'such'/'x.png')
    assert rc == 1 and one_line(e) == f"metai plot: error: {tmp_path/'no'/'such'/'x.png'}: no such folder {tmp_path/'no'/'such'}", e
    before = snapshot(ref)
    rc, o, e = metai('plot', ref, '--out', ref/'metrics.jsonl')
    assert rc == 1 and one_line(e).endswith('metrics.jsonl: is the metrics file being plotted; write the plot elsewhere'), e
    assert snapshot(ref) == before
    rc, o, e = metai('plot', ref, '--out', '')
    assert rc == 2 and '--out: must not be empty' in one_line(e), e
    assert sorted(p.name for p in tmp_path.iterdir()) == ['loss.png', 'plots']

def test_train_micro_help_lists_the_flags():
    rc, o, e = metai('train-micro', '--help')
    assert rc == 0 and e == ''
    for flag in ['--chinese-path', '--english-path', '--output-dir', '--data-dir', '--vocab-size', '--steps', '--tokens',
                 '--batch-size', '--seq-len', '--grad-accum', '--lr', '--warmup', '--schedule', '--eval-interval', '--seed',
                 '--device', '--compile', '--compile-mode', '--deterministic', '--resume', '--sample-prompt',
                 '--distill-from', '--distill-weight', '--distill-temperature']:
        assert flag in o, flag
    assert '(default: output_micro)' in o
    rc, o, e = metai('train-custom', '--help')
    for flag in ['--hidden-dim', '--num-layers', '--num-heads', '--num-kv-heads', '--mlp-dim', '--attn-type', '--kv-lora-rank',
                 '--q-lora-rank', '--n-routed-experts', '--n-activated-experts', '--n-shared-experts', '--moe-ffn-dim',
                 '--n-dense-layers', '--score-func', '--mtp-depth', '--max-seq-len', '--preset']:
        assert flag in o, flag

# --- distillation: a draft trained towards its target ------------------------------------------------------------

def kl_to(teacher_dir, student_dir, data_dir):
    "Mean KL(teacher || student) per token on the validation windows of `data_dir`."
    from metai.data.tokenizer import Tokenizer
    from metai.data.datasets import LazyTextDataset
    from metai.train.loop import load_teacher, distill_kl
    from metai.config import ModelConfig
    tok = Tokenizer(str(Path(data_dir)/'tokenizer.model'))
    cfg = ModelConfig.from_json(str(Path(student_dir)/'config.json'))
    t, s = (load_teacher(str(d), cfg, tok, 64, torch.device('cpu')) for d in (teacher_dir, student_dir))
    ds = LazyTextDataset(str(data_dir), 64, split='val', seed=0)
    with torch.no_grad(): return sum(distill_kl(s(x)[0], t(x)[0]).item() for x, _ in (ds.get_batch(8) for _ in range(4))) / 4

def test_distillation_pulls_the_model_towards_its_teacher(corpus, ref, tmp_path):
    """A one-layer model trained 30 steps with `--distill-from` ends closer to its teacher (KL on held-out windows) than
    the same model trained without it, and logs the term. The teacher is the 3-layer run's shape with fresh random
    weights, a distribution far from the data's, so that the two runs must differ (against a teacher that has learnt
    these few repeated sentences, the data and the teacher pull the same way)."""
    from safetensors.torch import save_model
    from metai.config import ModelConfig
    from metai.model.transformer import Transformer
    teacher = tmp_path/'teacher'; teacher.mkdir()
    for f in ('config.json', 'tokenizer.model'): shutil.copy(ref/f, teacher/f)
    torch.manual_seed(123); save_model(Transformer(ModelConfig.from_json(str(ref/'config.json'))), str(teacher/'model.safetensors'))
    small = ('--hidden-dim', 48, '--num-layers', 1, '--steps', 30, '--eval-interval', 30)
    rc, o, e = metai(*train_args(corpus, tmp_path/'plain', 96, *small))
    assert (rc, e) == (0, ''), e
    rc, o, e = metai(*train_args(corpus, tmp_path/'distilled', 96, *small, '--distill-from', teacher, '--distill-weight', 2))
    assert (rc, e) == (0, ''), e
    assert f'distill: from {teacher}, weight 2' in o
    recs = [json.loads(l) for l in open(tmp_path/'distilled'/'metrics.jsonl')]
    kls = [r['distill_kl'] for r in recs if 'distill_kl' in r]
    assert len(kls) == 30
    # a teacher at weight 0 changes nothing: the same losses at every step (loading it draws no random numbers)
    rc, o, e = metai(*train_args(corpus, tmp_path/'zero', 96, *small, '--distill-from', teacher, '--distill-weight', 0))
    assert (rc, e) == (0, ''), e
    ces = lambda d: [r['ce'] for r in map(json.loads, open(d/'metrics.jsonl')) if 'ce' in r]
    assert ces(tmp_path/'zero') == ces(tmp_path/'plain')
    # resuming keeps the loss: without the teacher (or with another weight) it is refused, and nothing is touched
    before = (tmp_path/'distilled'/'metrics.jsonl').read_bytes()
    for flags in ((), ('--distill-from', teacher, '--distill-weight', 3)):
        rc, o, e = metai(*train_args(corpus, tmp_path/'distilled', 96, *small, '--steps', 40, '--resume', *flags))
        assert rc == 1 and 'resume it with the same --distill-* flags' in one_line(e), e
    assert (tmp_path/'distilled'/'metrics.jsonl').read_bytes() == before
    plain, distilled = kl_to(teacher, tmp_path/'plain', corpus[0]/'data'), kl_to(teacher, tmp_path/'distilled', corpus[0]/'data')
    assert distilled < 0.5 * plain, (distilled, plain)

def test_distillation_bad_teacher(corpus, ref, tmp_path):
    "A missing teacher folder, one with another vocabulary and one with another tokenizer: one-line errors, nothing written."
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--distill-from', tmp_path/'nope'))
    assert rc == 1 and f'{tmp_path/"nope"}: no such model folder' in one_line(e)
    bad = tmp_path/'bad'; shutil.copytree(ref, bad, symlinks=False, ignore=shutil.ignore_patterns('checkpoints', 'data'))
    cfg = json.loads((bad/'config.json').read_text()); cfg['vocab_size'] = 1024; (bad/'config.json').write_text(json.dumps(cfg))
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--distill-from', bad))
    assert rc == 1 and 'config.json: the teacher predicts 1024 tokens and the model 512' in one_line(e)
    shutil.copy(ref/'config.json', bad/'config.json')
    from metai.data.corpus import prepare_data
    d, zh, en = corpus
    other = prepare_data(chinese_path=str(zh), english_path=str(en), out_dir=str(tmp_path/'other'), vocab_size=600)
    shutil.copy(tmp_path/'other'/'tokenizer.model', bad/'tokenizer.model')
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--distill-from', bad))
    assert rc == 1 and 'tokenizer.model: the teacher was trained with another tokenizer' in one_line(e)
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--distill-from', ref, '--distill-temperature', 0))
    assert rc == 2 and '--distill-temperature' in one_line(e)
    for bad_w in ('nan', 'inf', -1):
        rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--distill-from', ref, '--distill-weight', bad_w))
        assert rc == 2 and '--distill-weight' in one_line(e)
    rc, o, e = metai(*train_args(corpus, tmp_path/'x', 96, '--distill-weight', 2))
    assert rc == 2 and 'only with --distill-from' in one_line(e)
    assert not (tmp_path/'x').exists()
    # without --data-dir the data would be built inside the output folder: the teacher folder is checked first
    args = train_args(corpus, tmp_path/'y', 96, '--distill-from', tmp_path/'nope')
    i = args.index('--data-dir'); del args[i:i + 2]
    rc, o, e = metai(*args)
    assert rc == 1 and 'no such model folder' in one_line(e) and not (tmp_path/'y').exists()

# --- CUDA: the training step as CUDA graphs -------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_reduce_overhead_steps_match(mode='reduce-overhead', device='cuda'):
    """AdamW steps of a DeepSeek-style MoE (MLA, sigmoid router with bias updates, MTP) through `compile_model` in
    reduce-overhead mode (the step as CUDA graphs, replayed on new batches and updated weights): at every step the loss
    and gradients equal those of the same compiled step run without graphs on the same weights and batch."""
    from metai.config import ModelConfig
    from metai.model.transformer import Transformer
    from metai.model.moe import moe_update_bias
    from metai.train.loop import TrainConfig, configure_optimizer, compile_model
    cfg = ModelConfig.preset('ds-tiny', vocab_size=512, max_seq_len=128)
    torch.manual_seed(0)
    m, check = Transformer(cfg).to(device).train(), Transformer(cfg).to(device).train()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, cfg.vocab_size, (4, 129), generator=g).to(device) for _ in range(2)]
    torch._dynamo.reset()
    fwd = compile_model(m, TrainConfig(compile=True, compile_mode=mode))
    fwd_check = compile_model(check, TrainConfig(compile=True))
    opt = configure_optimizer(m, 3e-3, 0.1, device_type=device)
    losses = []
    for step in range(8):
        t = batches[step % 2]
        check.load_state_dict(m.state_dict())  # the reference: the same weights and batch, no graphs
        out = []
        for model, f in ((m, fwd), (check, fwd_check)):
            with torch.autocast(device, dtype=torch.bfloat16): _, loss, aux = f(t[:, :-1], t[:, 1:])
            loss.backward()
            out.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]), aux['load'].clone()))
        (l, gm, load), (lc, gc, _) = out
        assert abs(l - lc) <= 1e-3, (step, l, lc)
        assert (gm - gc).norm() <= 1e-2 * gc.norm(), (step, ((gm - gc).norm() / gc.norm()).item())
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True); check.zero_grad(set_to_none=True)
        moe_update_bias(m, load)
        losses.append(l)
    torch._dynamo.reset()
    assert losses[-1] < losses[0] - 0.5, losses  # it trains

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_clip_step_matches_clip_grad_norm(device='cuda'):
    """`clip_step` on CUDA (clipping folded into the fused AdamW's `grad_scale`) takes the step that `clip_grad_norm_`
    then `step` takes, from the same weights, moments and gradients, where the clipping takes effect (moments built by
    two earlier clipped steps); a NaN loss moves nothing."""
    from metai.config import ModelConfig
    from metai.model.transformer import Transformer
    import copy
    from metai.train.loop import configure_optimizer, clip_step
    cfg = ModelConfig.preset('micro', vocab_size=512, max_seq_len=64, n_layers=2)
    t = torch.randint(0, 512, (4, 65), generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    models = [Transformer(cfg).to(device).train() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [configure_optimizer(m, 1e-3, 0.1, device_type=device) for m in models]
    assert all(o.param_groups[0]['fused'] for o in opts)
    def grads(m):
        with torch.autocast(device, dtype=torch.bfloat16): loss = m(t[:, :-1], t[:, 1:], loss_only=True)[1]
        loss.backward(); return loss.detach()
    for _ in range(2):  # moments that are not a first step's
        grads(models[0]); torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.1); opts[0].step(); opts[0].zero_grad()
    models[1].load_state_dict(models[0].state_dict()); opts[1].load_state_dict(copy.deepcopy(opts[0].state_dict()))  # a copy: the moments would be shared
    loss = grads(models[0]); grads(models[1])
    g0 = torch.cat([p.grad.flatten() for p in models[0].parameters()]); g1 = torch.cat([p.grad.flatten() for p in models[1].parameters()])
    assert torch.equal(g0, g1)
    na = torch.nn.utils.clip_grad_norm_(models[0].parameters(), 0.1).item(); opts[0].step()
    nb, bad = clip_step(opts[1], list(models[1].parameters()), 0.1, loss)
    assert na > 0.1 and not bad.item() and abs(nb.item() - na) <= 1e-5 * na, (na, nb.item())  # the clipping took effect
    a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models)
    assert (a - b).abs().max().item() <= 1e-6, (a - b).abs().max().item()
    m, opt = models[1], opts[1]
    opt.zero_grad(); grads(m)
    _, bad = clip_step(opt, list(m.parameters()), 0.1, torch.tensor(float('nan'), device=device))
    assert bad.item() and torch.equal(torch.cat([p.detach().flatten() for p in m.parameters()]), b)

# --- non-finite losses: skipped on the device, reported, and a run of them stops training ----------------------------

class Recorder:
    "A monitor that keeps what the loop reports."
    def __init__(self): self.records, self.messages = [], []
    def log(self, rec): self.records.append(rec)
    def message(self, text): self.messages.append(text)
    def close(self): pass

def poisoned(bad_steps:set):
    "A Transformer whose training loss is NaN on the given (0-based) forward calls."
    from metai.model.transformer import Transformer
    class Poisoned(Transformer):
        calls = 0
        def forward(self, tokens, targets=None, **kw):
            logits, loss, aux = super().forward(tokens, targets, **kw)
            if targets is not None and self.training:
                if Poisoned.calls in bad_steps: loss = loss * float('nan')
                Poisoned.calls += 1
            return logits, loss, aux
    return Poisoned

def test_non_finite_steps_are_skipped_then_stop(corpus, tmp_path, monkeypatch):
    import metai.train.loop as loop
    from metai.config import ModelConfig
    from metai.data.corpus import prepare_data
    from metai.model.transformer import Transformer
    d, zh, en = corpus
    data = tmp_path/'data'
    prepare_data(chinese_path=str(zh), english_path=str(en), out_dir=str(data), vocab_size=512)
    cfg = ModelConfig.preset('micro', vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64)
    tc = lambda out, steps: loop.TrainConfig(out_dir=str(tmp_path/out), data_dir=str(data), batch_size=4, seq_len=64, max_steps=steps,
                                             warmup_steps=2, eval_interval=100, log_interval=4, max_bad_steps=3, device='cpu')
    # two bad steps (calls 2 and 5): both updates skipped, reported, the run finishes with finite weights and losses
    monkeypatch.setattr(loop, 'Transformer', poisoned({2, 5}))
    mon = Recorder()
    r = loop.train(cfg, tc('a', 8), monitor=mon)
    assert r['step'] == 8 and math.isfinite(r['val_loss'])
    assert any('non-finite' in m for m in mon.messages), mon.messages
    assert sum(int(m.split(': ')[1].split()[0]) for m in mon.messages if 'non-finite' in m) == 2, mon.messages
    assert all(math.isfinite(x['loss']) for x in mon.records if 'loss' in x)
    ck = loop.latest_checkpoint(str(tmp_path/'a'))
    m = Transformer(cfg); loop.load_weights(m, os.path.join(ck, 'model.safetensors'))
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # a skipped update leaves the optimizer's step count behind the loop's by the number of bad steps
    st = loop.load_train_state(os.path.join(ck, 'train_state.pt'))
    assert st['step'] == 8 and all(s['step'] == 6 for s in st['optimizer']['state'].values())
    # three in a row (max_bad_steps=3) stop the run with a one-line error
    monkeypatch.setattr(loop, 'Transformer', poisoned(set(range(3, 100))))
    with pytest.raises(FloatingPointError, match='3 steps in a row with a non-finite loss or gradient norm'):
        loop.train(cfg, tc('b', 20), monitor=Recorder())
