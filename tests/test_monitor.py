"The training monitor: metrics.jsonl, resume truncation, plain lines, the live dashboard on a real pty, plots, bad files."
import io, json, math, os, pty, re, select, subprocess, sys, time
from pathlib import Path
import pytest
from rich.console import Console

from metai.train.monitor import Monitor, sparkline, fmt_duration, read_metrics, plot_metrics, imbalance

ROOT = Path(__file__).resolve().parent.parent

def train_rec(step, **kw):
    return {'step': step, 'loss': 9 - step / 100, 'ce': 9 - step / 100, 'lr': 1e-3, 'grad_norm': 0.5, 'tokens_per_s': 1000.0, **kw}

def lines(d): return (Path(d)/'metrics.jsonl').read_text().splitlines()

# --- metrics.jsonl ------------------------------------------------------------------------------------------------

def test_jsonl_records_are_written_and_flushed(tmp_path, capsys):
    mon = Monitor(tmp_path, total_steps=100, live=False)
    mon.log(train_rec(10, expert_load=[0.5, 0.25, 0.25]))
    assert len(lines(tmp_path)) == 1                 # flushed at once, before close
    mon.log({'step': 10, 'val_loss': 3.5, 'val_bpb': 1.25})
    mon.message('sample @ 10: hello\nworld')
    mon.close(); mon.close()                         # closing twice is fine
    recs = [json.loads(l) for l in lines(tmp_path)]
    assert len(recs) == 3
    assert recs[0]['step'] == 10 and recs[0]['loss'] == pytest.approx(8.9) and recs[0]['expert_load'] == [0.5, 0.25, 0.25]
    assert 0 <= recs[0]['time'] <= recs[1]['time'] < 60
    assert recs[1] == {'step': 10, 'val_loss': 3.5, 'val_bpb': 1.25, 'time': recs[1]['time']}
    assert recs[2] == {'step': 10, 'message': 'sample @ 10: hello\nworld'}
    assert read_metrics(tmp_path) == recs

def test_tensor_and_numpy_values_become_numbers(tmp_path, capsys):
    import torch, numpy as np
    with Monitor(tmp_path, total_steps=10, live=False) as mon:
        mon.log({'step': torch.tensor(3), 'loss': torch.tensor(2.5), 'lr': np.float32(1e-3), 'grad_norm': np.float64(0.5),
                 'tokens_per_s': None, 'expert_load': torch.tensor([0.5, 0.5])})
    r = read_metrics(tmp_path)[0]
    assert r['step'] == 3 and r['loss'] == 2.5 and r['lr'] == pytest.approx(1e-3) and r['expert_load'] == [0.5, 0.5]
    assert r['tokens_per_s'] is None

def test_log_needs_a_step(tmp_path):
    with Monitor(tmp_path, total_steps=10, live=False) as mon:
        with pytest.raises(ValueError, match="'step'"): mon.log({'loss': 1.0})

def test_fresh_start_truncates(tmp_path, capsys):
    (tmp_path/'metrics.jsonl').write_text('{"step": 500, "loss": 1.0}\n')
    with Monitor(tmp_path, total_steps=10, live=False) as mon:
        assert lines(tmp_path) == []
        mon.log(train_rec(1))
    assert [r['step'] for r in read_metrics(tmp_path)] == [1]

# --- resume -------------------------------------------------------------------------------------------------------

def test_resume_keeps_records_up_to_start_step(tmp_path, capsys):
    with Monitor(tmp_path, total_steps=100, live=False) as mon:
        for s in range(10, 60, 10):
            mon.log(train_rec(s))
            if s % 20 == 0: mon.log({'step': s, 'val_loss': 5.0, 'val_bpb': 2.0}); mon.message(f'sample @ {s}')
    with open(tmp_path/'metrics.jsonl', 'a') as f: f.write('{"step": 60, "loss": 3.1, "l')   # killed mid-write
    before = read_metrics(tmp_path)
    t_kept = max(r['time'] for r in before if 'time' in r and r['step'] <= 30)
    time.sleep(0.05)
    with Monitor(tmp_path, total_steps=100, start_step=30, live=False) as mon:
        kept = read_metrics(tmp_path)
        assert kept == [r for r in before if r['step'] <= 30]     # same records, same order, half line gone
        assert {r['step'] for r in kept} == {10, 20, 30} and any('message' in r for r in kept)
        assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl']   # the atomic rewrite left no temp file
        mon.log(train_rec(40))
        assert mon.step == 40
    recs = read_metrics(tmp_path)
    assert [r['step'] for r in recs if 'loss' in r] == [10, 20, 30, 40]   # step 40 once, from the resumed run
    assert recs[-1]['time'] >= t_kept                                    # the clock continues across the resume

def test_resume_without_a_metrics_file(tmp_path, capsys):
    with Monitor(tmp_path, total_steps=100, start_step=50, live=False) as mon: mon.log(train_rec(60))
    assert [r['step'] for r in read_metrics(tmp_path)] == [60]

def test_resume_refuses_a_damaged_log(tmp_path):
    (tmp_path/'metrics.jsonl').write_text('{"step": 10, "loss": 1.0}\nnot json\n{"step": 20, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r'metrics\.jsonl:2: not a JSON line'):
        Monitor(tmp_path, total_steps=100, start_step=20, live=False)
    assert (tmp_path/'metrics.jsonl').read_text().count('\n') == 3    # nothing rewritten

# --- plain mode ---------------------------------------------------------------------------------------------------

def test_plain_lines(tmp_path, capsys):
    with Monitor(tmp_path, total_steps=1000, live=False) as mon:
        mon.log({'step': 100, 'loss': 3.2144, 'lr': 1e-3, 'grad_norm': 0.81, 'tokens_per_s': 45210, 'mfu': 0.312})
        mon.log({'step': 100, 'val_loss': 3.3, 'val_bpb': 1.21})
        mon.log({'step': 110, 'loss': 3.1, 'lr': 1e-3, 'grad_norm': 0.7, 'tokens_per_s': None, 'mem_gb': 12.34,
                 'mtp_loss': 3.5, 'expert_load': [0.4, 0.2, 0.2, 0.2], 'reward': 0.75})
        mon.message('sample @ 110: hi')
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4
    assert re.fullmatch(r'step 100/1000 \| loss 3\.214 \| lr 1\.0e-03 \| gnorm 0\.81 \| 45\.2K tok/s \| mfu 31\.2% \| eta \d+s', out[0]), out[0]
    assert out[1] == 'eval step 100 | val_loss 3.300 | bpb 1.210'
    assert re.fullmatch(r'step 110/1000 \| loss 3\.100 \| mtp 3\.500 \| lr 1\.0e-03 \| gnorm 0\.70 \| mem 12\.3G \| '
                        r'moe max/mean 1\.60 \| reward 0\.75 \| eta \S+', out[2]), out[2]
    assert 'tok/s' not in out[2] and 'mfu' not in out[2]
    assert out[3] == 'sample @ 110: hi'

def test_eta_follows_the_step_rate(tmp_path, capsys):
    mon = Monitor(tmp_path, total_steps=100, live=False)
    assert mon.eta() is None
    mon.rate.clear(); now = time.perf_counter()
    mon.rate.extend([(now - 10, 10), (now, 20)])     # 1 step/s, 80 steps to go
    assert mon.eta() == pytest.approx(80, abs=0.5)
    mon.close()

def test_sparkline():
    assert sparkline([1, 2, 3, 4, 5, 6, 7, 8]) == '▁▂▃▄▅▆▇█'
    assert sparkline([]) == '' and sparkline([5.0]) == '▁' and sparkline([2, 2]) == '▁▁'
    assert sparkline([math.nan, 0, None, math.inf, 1]) == '▁█'
    assert sparkline(range(100), 0) == ''
    s = sparkline(range(1000), 25)
    assert len(s) == 25 and s[0] == '▁' and s[-1] == '█' and list(s) == sorted(s)
    assert sparkline([0, 10, 0, 10], 2) == '▁▁'            # averaged in chunks: 5, 5
    assert sparkline([0, 0, 10, 10], 2) == '▁█'

def test_fmt_duration_and_imbalance():
    assert [fmt_duration(x) for x in (5, 252, 3725, 90000, None)] == ['5s', '4m12s', '1h02m', '1d01h', '?']
    assert imbalance([0.25] * 4) == 1.0 and imbalance([0.7, 0.1, 0.1, 0.1]) == pytest.approx(2.8)

# --- live mode ----------------------------------------------------------------------------------------------------

def test_dashboard_frame(tmp_path):
    buf = io.StringIO()
    con = Console(file=buf, width=100, force_terminal=True, color_system='truecolor')
    mon = Monitor(tmp_path, total_steps=200, live=True, console=con)
    assert mon.live is not None
    for s in range(10, 110, 10): mon.log(train_rec(s, mfu=0.3, mem_gb=7.5, expert_load=[0.4, 0.2, 0.2, 0.2]))
    mon.log({'step': 100, 'val_loss': 3.25, 'val_bpb': 1.1})
    mon.message('sample @ 100: the quick brown fox')
    rec = Console(record=True, width=100, file=io.StringIO()); rec.print(mon.render()); frame = rec.export_text()
    mon.close()
    for s in ('step 100/200', ' 50%', 'loss', '8.0000', 'val loss', '3.2500', 'best 3.2500 @ 100', '40.0%', 'MFU', '30.0%',
              '7.50 GiB', 'GPU peak', 'expert load · 4 experts · imbalance max/mean 1.60', 'e3', 'sample @ 100: the quick'):
        assert s in frame, (s, frame)
    assert '█' in frame and '▁' in frame                        # sparklines and bars
    out = buf.getvalue()
    assert '\x1b[' in out and 'expert load' in out               # the live display drew with escape codes
    assert len(lines(tmp_path)) == 12                             # and the file got everything

LIVE_SCRIPT = r'''
import sys, time
from metai.train.monitor import Monitor
with Monitor(sys.argv[1], total_steps=50) as mon:
    print('MODE', 'live' if mon.live is not None else 'plain', flush=True)
    for s in range(1, 51):
        mon.log({'step': s, 'loss': 5 - s / 20, 'lr': 1e-3, 'grad_norm': 0.5, 'tokens_per_s': 1234.0, 'expert_load': [0.3, 0.7]})
        time.sleep(0.02)
'''

def run_in_pty(args, env):
    "Run a command with stdout/stderr on a pseudo-terminal; returns everything it wrote."
    master, slave = pty.openpty()
    p = subprocess.Popen(args, stdout=slave, stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    out, deadline = b'', time.time() + 60
    while time.time() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try: chunk = os.read(master, 65536)
            except OSError: break                     # EIO: the child closed the terminal
            if not chunk: break
            out += chunk
        elif p.poll() is not None: break
    p.wait(timeout=30); os.close(master)
    assert p.returncode == 0, out.decode(errors='replace')
    return out.decode('utf-8', errors='replace')

@pytest.mark.parametrize('plain', [False, True])
def test_auto_mode_on_a_real_terminal(tmp_path, plain):
    env = dict(os.environ, OMP_NUM_THREADS='1', TERM='xterm-256color', COLUMNS='100', LINES='40', PYTHONPATH=str(ROOT))
    env.pop('METAI_PLAIN', None)
    if plain: env['METAI_PLAIN'] = '1'
    out = run_in_pty([sys.executable, '-c', LIVE_SCRIPT, str(tmp_path)], env)
    assert len(read_metrics(tmp_path)) == 50
    if plain:
        assert 'MODE plain' in out and 'step 50/50 | loss 2.500' in out and '\x1b[' not in out
    else:
        assert 'MODE live' in out
        assert '\x1b[' in out and '\x1b[?25l' in out                # cursor hidden while the dashboard redraws
        assert 'step 50/50' in out and 'expert load' in out and '━' in out
        assert 'step 50/50 | loss' not in out                      # no plain lines in live mode

def test_auto_mode_without_a_terminal(tmp_path):
    r = subprocess.run([sys.executable, '-c', LIVE_SCRIPT, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT)))
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == 'MODE plain' and len(out) == 51 and '\x1b[' not in r.stdout
    assert out[-1].startswith('step 50/50 | loss 2.500 | lr 1.0e-03 | gnorm 0.50 | 1.2K tok/s | moe max/mean 1.40 | eta ')

# --- plots and bad files ------------------------------------------------------------------------------------------

def test_plot_metrics(tmp_path, capsys):
    run = tmp_path/'run'
    with Monitor(run, total_steps=300, live=False) as mon:
        for s in range(1, 301):
            mon.log(train_rec(s, mtp_loss=9.5 - s / 100, ce=8.9 - s / 100))
            if s % 50 == 0: mon.log({'step': s, 'val_loss': 9 - s / 90, 'val_bpb': 2.0}); mon.message(f'sample @ {s}')
    with open(run/'metrics.jsonl', 'a') as f: f.write('{"step": 301, "lo')     # a truncated last line is fine
    png = plot_metrics(str(run))
    assert png == str(run/'loss.png')
    data = Path(png).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 10_000
    other = plot_metrics(str(run/'metrics.jsonl'), str(tmp_path/'curves.png'))   # the file itself, another output
    assert other == str(tmp_path/'curves.png') and Path(other).stat().st_size > 10_000
    assert sorted(os.listdir(run)) == ['loss.png', 'metrics.jsonl']           # no temp files left

def test_plot_eval_only(tmp_path):
    (tmp_path/'metrics.jsonl').write_text('{"step": 10, "val_loss": 4.0}\n{"step": 20, "val_loss": 3.5}\n')
    assert Path(plot_metrics(tmp_path)).stat().st_size > 5_000

@pytest.mark.parametrize('content,match', [
    (None, r'metrics\.jsonl: no such file'),
    (b'', r'metrics\.jsonl: empty file'),
    (b'\n\n', r'metrics\.jsonl: empty file'),
    (b'{"step": 1, "message": "hi"}\n', r"metrics\.jsonl: no 'loss' or 'val_loss' records"),
    (b'{"step": 1, "loss": 2}\n{"step": 2, "loss": \n{"step": 3, "loss": 2}\n', r'metrics\.jsonl:2: not a JSON line'),
    (b'{"step": 1, "loss": 2}\n{"step": 2, "loss": 1.5, "note": "\xff"}\n', r'metrics\.jsonl:2: invalid UTF-8'),
    (b'[1, 2]\n', r'metrics\.jsonl:1: expected a JSON object'),
    (b'{"loss": 2}\n', r"metrics\.jsonl:1: field 'step'"),
    (b'{"step": "7", "loss": 2}\n', r"metrics\.jsonl:1: field 'step'"),
])
def test_bad_metrics_files(tmp_path, content, match):
    if content is not None: (tmp_path/'metrics.jsonl').write_bytes(content)
    with pytest.raises(ValueError, match=match) as e: plot_metrics(tmp_path)
    assert str(tmp_path) in str(e.value) and '\n' not in str(e.value)
    assert not (tmp_path/'loss.png').exists()

def test_metrics_path_is_a_folder(tmp_path):
    (tmp_path/'metrics.jsonl').mkdir()
    with pytest.raises(ValueError, match='is a folder'): read_metrics(tmp_path)
