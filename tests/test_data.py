"Tests of metai.data.corpus (readers, default corpus, prepare_data) and metai.data.datasets (LazyTextDataset)."
import os, json, shutil
from pathlib import Path
import numpy as np
import pytest
import torch

from metai.data import corpus as C
from metai.data.corpus import (CorpusError, corpus_stats, iter_documents, resolve_files, build_default_corpus, clean_fortune,
                               prepare_data, token_dtype, val_mask, INSTALL_HINT, OUTPUTS, FORTUNES_DIR)
from metai.data.datasets import LazyTextDataset, permute, epoch_keys
from metai.data.tokenizer import Tokenizer

VOCAB = 600


def gen_docs(n_zh, n_en, seed=0):
    "Synthetic bilingual documents (some with inner line breaks)."
    rng = np.random.default_rng(seed)
    hz = list('天地玄黄宇宙洪荒日月盈昃辰宿列张寒来暑往秋收冬藏春江花月夜山水风云明光思故乡人心')
    words = 'the a of to and in is it that for on with as was at by an be this from or have not but are'.split()
    zh = ['，\n'.join(''.join(rng.choice(hz, 5)) for _ in range(rng.integers(2, 9))) + '。' for _ in range(n_zh)]
    en = [' '.join(rng.choice(words, rng.integers(5, 60))).capitalize() + '.' for _ in range(n_en)]
    return zh, en


def write_corpus(d, zh, en):
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    (d/'zh.txt').write_text('\n\n'.join(zh) + '\n', encoding='utf-8')
    with open(d/'en.jsonl', 'w', encoding='utf-8') as f:
        for t in en: f.write(json.dumps({'text': t}, ensure_ascii=False) + '\n')
    return d/'zh.txt', d/'en.jsonl'


def error_of(f):
    with pytest.raises(CorpusError) as e: f()
    msg = str(e.value)
    assert '\n' not in msg
    return msg


def read(path, **kw): return list(iter_documents(path, **kw))


# ----------------------------------------------------------------------------------------------------------------------
# readers

def test_txt_and_jsonl_documents(tmp_path):
    (tmp_path/'sub').mkdir(); (tmp_path/'.hidden').mkdir()
    (tmp_path/'b.txt').write_bytes('\ufeff第一篇\n第二行\n\n\n  \nsecond doc\r\nline two\r\n'.encode())
    (tmp_path/'sub'/'a.jsonl').write_text('{"text": "x\\n\\ny", "meta": 1}\n\n{"text": "z"}\n')
    (tmp_path/'.hidden'/'c.txt').write_text('hidden')
    (tmp_path/'skip.md').write_text('not corpus')
    test_files = resolve_files(tmp_path)
    assert test_files == [str(tmp_path/'b.txt'), str(tmp_path/'sub'/'a.jsonl')]
    stats = corpus_stats()
    assert read(tmp_path, stats=stats) == ['第一篇\n第二行', 'second doc\nline two', 'x\n\ny', 'z']
    assert (stats['files'], stats['docs'], stats['bad']) == (2, 4, 0)
    assert read(str(tmp_path/'**'/'*.jsonl')) == ['x\n\ny', 'z']
    (tmp_path/'notes').write_text('a file named explicitly is read as text\n')
    assert read(tmp_path/'notes') == ['a file named explicitly is read as text']


def test_invalid_utf8_txt(tmp_path):
    p = tmp_path/'bad.txt'
    p.write_bytes(b'ok doc\n\nsecond line \xc3\x28 here\nmore\n\nlast\n')
    assert error_of(lambda: read(p)) == f"{p}: line 3, byte 20: invalid UTF-8 (0xc3)"
    assert isinstance(CorpusError('x'), ValueError)
    stats = corpus_stats()
    assert read(p, skip_bad=True, stats=stats) == ['ok doc', 'last']
    assert (stats['bad'], stats['docs'], stats['errors']) == (1, 2, [f"{p}: line 3, byte 20: invalid UTF-8 (0xc3)"])


def test_invalid_utf8_jsonl_points_at_the_byte(tmp_path):
    p = tmp_path/'bad.jsonl'
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert error_of(lambda: read(p)) == f"{p}: line 2, byte 30: invalid UTF-8 (0xe9)"


def test_jsonl_record_errors(tmp_path):
    lines = ['{"text": "ok"}', '{"text": "a"', '{"title": "x", "body": "y"}', '{"text": null}', '"just a string"',
             '{"text": "\\udc80"}', '{"text": ["a"]}']
    p = tmp_path/'r.jsonl'; p.write_text('\n'.join(lines) + '\n')
    off = np.cumsum([0] + [len(l) + 1 for l in lines])
    expected = [
        f'{p}: line 2, byte {off[1]}: malformed JSON: Expecting \',\' delimiter (column 13)',
        f'{p}: line 3, byte {off[2]}: missing field "text" (fields: title, body)',
        f'{p}: line 4, byte {off[3]}: field "text" must be a string, got null',
        f'{p}: line 5, byte {off[4]}: expected an object with a "text" field, got a string',
        f'{p}: line 6, byte {off[5]}: field "text" has an unpaired surrogate (\\udc80)',
    ]
    stats = corpus_stats()
    assert read(p, skip_bad=True, stats=stats) == ['ok']
    assert stats['bad'] == 6 and stats['errors'] == expected  # all six counted, the first five kept
    for i in range(1, len(lines)):  # each bad line alone, without skip_bad, is an error naming that line
        q = tmp_path/f'one{i}.jsonl'; q.write_text(lines[0] + '\n' + lines[i] + '\n')
        msg = error_of(lambda: read(q))
        assert msg.startswith(f'{q}: line 2, byte {len(lines[0]) + 1}: '), msg
    assert error_of(lambda: read(tmp_path/'one6.jsonl')).endswith('field "text" must be a string, got an array')


def test_empty_and_missing_inputs(tmp_path):
    (tmp_path/'empty.txt').write_text('')
    assert error_of(lambda: read(tmp_path/'empty.txt')) == f"{tmp_path/'empty.txt'}: empty file (no documents)"
    (tmp_path/'blank.txt').write_text('\n \n\t\n')
    assert error_of(lambda: read(tmp_path/'blank.txt')) == f"{tmp_path/'blank.txt'}: empty file (no documents)"
    (tmp_path/'empty.jsonl').write_text('\n\n')
    assert error_of(lambda: read(tmp_path/'empty.jsonl')) == f"{tmp_path/'empty.jsonl'}: empty file (no documents)"
    (tmp_path/'ws.jsonl').write_text('{"text": ""}\n{"text": "  "}\n')
    assert error_of(lambda: read(tmp_path/'ws.jsonl')) == f"{tmp_path/'ws.jsonl'}: empty corpus (no documents)"
    assert error_of(lambda: read(tmp_path/'nope.txt')) == f"{tmp_path/'nope.txt'}: no such file or directory"
    assert error_of(lambda: read(str(tmp_path/'*.parquet'))) == f"{tmp_path/'*.parquet'}: no files match this pattern"
    (tmp_path/'d').mkdir(); (tmp_path/'d'/'x.csv').write_text('a,b')
    assert error_of(lambda: read(tmp_path/'d')) == f"{tmp_path/'d'}: directory has no .txt or .jsonl files"
    # with skip_bad an empty file among good ones is counted, not fatal
    (tmp_path/'e').mkdir(); (tmp_path/'e'/'a.txt').write_text('doc\n'); (tmp_path/'e'/'b.txt').write_text('')
    stats = corpus_stats()
    assert read(tmp_path/'e', skip_bad=True, stats=stats) == ['doc']
    assert stats['bad'] == 1 and stats['errors'] == [f"{tmp_path/'e'/'b.txt'}: empty file (no documents)"]


def test_reader_streams(tmp_path):
    "A reader is lazy: the first document arrives before the rest of the file is read."
    p = tmp_path/'big.txt'
    with open(p, 'w') as f:
        f.write('first\n\n')
        for i in range(200_000): f.write(f'doc {i}\n\n')
    it = iter_documents(p)
    assert next(it) == 'first'
    stats = corpus_stats()
    assert sum(1 for _ in iter_documents(p, stats=stats)) == 200_001 == stats['docs']


# ----------------------------------------------------------------------------------------------------------------------
# the default corpus

def make_fake_fortunes(d, english=('fortunes', 'wisdom')):
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    (d/'tang300').write_text('\x1b[32m《静夜思》\x1b[m\n\x1b[33m作者：李白\x1b[m\n\n床前明月光，\n%\n\x1b[32m《春晓》\x1b[m\n春眠不觉晓。\n%\n')
    (d/'song100').write_text('\x1b[32m词牌:《如梦令》\x1b[m\n常记溪亭日暮。\n%\n')
    (d/'chinese').write_bytes('\xa0\xa0 你可以通过“~/.bashrc”\x1b[;m来定制bash(1)的行为。\n'.encode())
    for n in english: (d/n).write_text('It is _\bv_\be_\br_\by good.\x07\n\n  -- Someone\n%\nSecond   \n%\n')
    (d/'off').mkdir(exist_ok=True); (d/'off'/'offensive').write_text('never read\n%\n')
    return d


def test_build_default_corpus_from_fake_packages(tmp_path, capsys):
    fdir = make_fake_fortunes(tmp_path/'fortunes')
    r = build_default_corpus(tmp_path/'out', fortunes_dir=fdir)
    zh, en = read(r['zh']['path']), read(r['en']['path'])
    assert zh == ['《静夜思》\n作者：李白\n床前明月光，', '《春晓》\n春眠不觉晓。', '词牌:《如梦令》\n常记溪亭日暮。',
                  '\xa0\xa0 你可以通过“~/.bashrc”来定制bash(1)的行为。']
    assert en == ['It is very good.\n  -- Someone', 'Second'] * 2
    assert (r['zh']['docs'], r['en']['docs'], r['en']['files']) == (4, 4, 2)
    assert r['zh']['chars'] == sum(map(len, zh)) and r['zh']['encodings'] == ['utf-8']
    assert 'default corpus zh: 4 docs' in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path/'out')) == ['en.txt', 'zh.txt']  # no temporary files


def test_default_corpus_gb2312_fallback(tmp_path):
    fdir = make_fake_fortunes(tmp_path/'fortunes')
    (fdir/'tang300').write_bytes('静夜思\n床前明月光\n%\n'.encode('gb2312'))
    r = build_default_corpus(tmp_path/'out', fortunes_dir=fdir, verbose=False)
    assert read(r['zh']['path'])[0] == '静夜思\n床前明月光' and r['zh']['encodings'] == ['gb18030', 'utf-8']


def test_default_corpus_missing_packages(tmp_path):
    empty = tmp_path/'none'; empty.mkdir()
    assert error_of(lambda: build_default_corpus(tmp_path/'o', fortunes_dir=empty)) == \
        f"default corpus: fortunes-zh is not installed ({empty/'tang300'} is missing); {INSTALL_HINT}"
    assert 'sudo apt-get install fortunes fortunes-zh' in INSTALL_HINT and '--chinese-path' in INSTALL_HINT
    only_min = make_fake_fortunes(tmp_path/'min', english=('fortunes',))  # fortunes-min alone is not enough
    assert error_of(lambda: build_default_corpus(tmp_path/'o', fortunes_dir=only_min)) == \
        f"default corpus: fortunes is not installed ({only_min/'literature'} is missing); {INSTALL_HINT}"
    assert not (tmp_path/'o').exists()


def test_clean_fortune():
    assert clean_fortune('\x1b[1;31mred\x1b[0m x\bbold\r\n\n\n  \nnext\x07') == 'red bold\nnext'


@pytest.mark.skipif(not os.path.exists(os.path.join(FORTUNES_DIR, 'tang300')),
                    reason=f"the Debian fortunes-zh package is not installed ({FORTUNES_DIR}/tang300 missing)")
def test_real_default_corpus(tmp_path):
    r = build_default_corpus(tmp_path, verbose=False)
    zh, en = read(r['zh']['path']), read(r['en']['path'])
    assert (len(zh), len(en)) == (r['zh']['docs'], r['en']['docs'])
    assert 5_000 < len(zh) < 6_500 and 0.8e6 < r['zh']['chars'] < 1.2e6, r['zh']
    assert 14_000 < len(en) < 16_500 and 2.2e6 < r['en']['chars'] < 2.8e6, r['en']
    assert not any(c in d for d in zh + en for c in '\x1b\x08\x07')
    assert any('床前明月光' in d for d in zh)


# ----------------------------------------------------------------------------------------------------------------------
# prepare_data

@pytest.fixture(scope='module')
def docs():
    return gen_docs(300, 700)


@pytest.fixture(scope='module')
def built(tmp_path_factory, docs):
    d = tmp_path_factory.mktemp('built')
    zh_p, en_p = write_corpus(d/'corpus', *docs)
    r = prepare_data(zh_p, en_p, d/'out', vocab_size=VOCAB, workers=2, seed=0)
    return d, zh_p, en_p, r


def test_prepare_data_outputs(built, docs):
    d, zh_p, en_p, r = built
    out = d/'out'
    assert not r['reused']
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS + ('meta.json', 'tokenizer.model', 'tokenizer.meta.json'))
    meta = json.loads((out/'meta.json').read_text())
    tok = Tokenizer(out/'tokenizer.model')
    assert meta['dtype'] == 'uint16' and meta['tokenizer']['sha256'] == tok.sha256 == Tokenizer(out).sha256
    assert meta['tokenizer']['vocab_size'] == VOCAB and meta['doc_format'] == 'bos + tokens + eos'
    assert [s['name'] for s in meta['sources']] == ['zh', 'en']
    assert meta['sources'][1]['files'][0]['sha256'] == C.sha256_file(en_p)
    all_docs = docs[0] + docs[1]
    is_val = val_mask(len(all_docs), 0.01, 0)
    assert meta['splits']['val']['docs'] == 10 == is_val.sum()
    for split, want in (('train', [t for t, v in zip(all_docs, is_val) if not v]), ('val', [t for t, v in zip(all_docs, is_val) if v])):
        toks = np.fromfile(out/f'{split}.bin', dtype=np.uint16); idx = np.fromfile(out/f'{split}.idx', dtype=np.int64)
        assert len(toks) == meta['splits'][split]['tokens'] and len(idx) == len(want) + 1 and idx[-1] == len(toks)
        got = []
        for a, b in zip(idx[:-1], idx[1:]):
            assert toks[a] == tok.bos_id and toks[b - 1] == tok.eos_id
            got.append(tok.decode(toks[a + 1:b - 1].tolist()))
        assert got == want  # every document comes back exactly, in order
        assert meta['splits'][split]['by_source']['zh']['docs'] + meta['splits'][split]['by_source']['en']['docs'] == len(want)
    assert meta['tokens'] == meta['splits']['train']['tokens'] + meta['splits']['val']['tokens']
    assert meta['chars'] == sum(map(len, all_docs)) and meta['bytes'] == sum(len(t.encode()) for t in all_docs)
    assert meta['mb_per_s'] > 0 and meta['files'] == {n: (out/n).stat().st_size for n in OUTPUTS}


def test_reuse_and_rebuild(tmp_path, docs, capsys):
    zh_p, en_p = write_corpus(tmp_path/'c', *docs)
    out = tmp_path/'out'
    r1 = prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1)
    mtimes = {n: (out/n).stat().st_mtime_ns for n in OUTPUTS + ('meta.json', 'tokenizer.model')}
    capsys.readouterr()
    r2 = prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1)
    assert r2['reused'] and r2['key'] == r1['key'] and 'reusing' in capsys.readouterr().out
    assert mtimes == {n: (out/n).stat().st_mtime_ns for n in mtimes}  # nothing rewritten
    # a setting that changes the output rebuilds (the tokenizer too: it never sees validation documents)
    r3 = prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1, val_fraction=0.05)
    assert not r3['reused'] and r3['splits']['val']['docs'] == 50 and r3['tokenizer']['how'] == 'trained'
    # one changed byte in one input rebuilds
    data = bytearray(en_p.read_bytes()); i = data.index(b'the'); data[i:i + 3] = b'The'; en_p.write_bytes(bytes(data))
    r4 = prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1, val_fraction=0.05)
    assert not r4['reused'] and r4['key'] != r3['key']
    assert r4['sources'][0]['sha256'] == r3['sources'][0]['sha256'] and r4['sources'][1]['sha256'] != r3['sources'][1]['sha256']
    # a corrupted output file is noticed (size check) and rebuilt
    with open(out/'train.bin', 'ab') as f: f.write(b'\0\0')
    assert not prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1, val_fraction=0.05)['reused']
    # a tokenizer trained on the same inputs is reused when only the token files are missing
    (out/'meta.json').unlink(); (out/'train.bin').unlink()
    capsys.readouterr()
    r5 = prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1, val_fraction=0.05)
    assert r5['tokenizer']['how'] == 'reused' and 'reusing tokenizer' in capsys.readouterr().out
    assert r5['tokens'] == r4['tokens']


def test_moving_the_corpus_reuses(tmp_path, docs):
    zh_p, en_p = write_corpus(tmp_path/'c', *docs)
    r1 = prepare_data(zh_p, en_p, tmp_path/'out', vocab_size=VOCAB, workers=1)
    shutil.move(tmp_path/'c', tmp_path/'moved')
    r2 = prepare_data(tmp_path/'moved'/'zh.txt', tmp_path/'moved'/'en.jsonl', tmp_path/'out', vocab_size=VOCAB, workers=1)
    assert r2['reused'] and r2['key'] == r1['key']


def test_workers_and_seed_determinism(tmp_path, built):
    d, zh_p, en_p, r = built
    tok = d/'out'/'tokenizer.model'
    a = prepare_data(zh_p, en_p, tmp_path/'a', workers=1, tokenizer_path=tok)
    b = prepare_data(zh_p, en_p, tmp_path/'b', workers=2, tokenizer_path=tok)
    for n in OUTPUTS + ('tokenizer.model',):
        assert (tmp_path/'a'/n).read_bytes() == (tmp_path/'b'/n).read_bytes() == (d/'out'/n).read_bytes()
    assert a['tokenizer']['how'] == 'given' and a['tokenizer']['sha256'] == r['tokenizer']['sha256']
    c = prepare_data(zh_p, en_p, tmp_path/'c', workers=1, tokenizer_path=tok, seed=1)
    assert (tmp_path/'c'/'val.bin').read_bytes() != (tmp_path/'a'/'val.bin').read_bytes()
    assert c['splits']['val']['docs'] == a['splits']['val']['docs']


def test_zh_ratio(tmp_path, built):
    d, zh_p, en_p, r = built
    tok = d/'out'/'tokenizer.model'
    zc, ec = r['sources'][0]['chars'], r['sources'][1]['chars']
    assert 0.05 < zc / (zc + ec) < 0.3  # as generated: about 10% Chinese
    for ratio in (0.3, 0.05):  # more Chinese than the inputs have: English is sampled; less: Chinese is
        m = prepare_data(zh_p, en_p, tmp_path/str(ratio), zh_ratio=ratio, tokenizer_path=tok, workers=1)
        assert abs(m['zh_ratio_actual'] - ratio) < 0.04, (ratio, m['zh_ratio_actual'])
        zs, es = m['sources']
        if ratio * (zc + ec) >= zc: assert zs['kept_docs'] == zs['docs'] and es['kept_docs'] < es['docs']
        else: assert es['kept_docs'] == es['docs'] and zs['kept_docs'] < zs['docs']
        assert m['chars'] == zs['kept_chars'] + es['kept_chars']
    m = prepare_data(zh_p, en_p, tmp_path/'only_zh', zh_ratio=1.0, tokenizer_path=tok, workers=1)
    assert m['sources'][1]['kept_docs'] == 0 and m['zh_ratio_actual'] == 1.0


def test_skip_bad_counts_and_reports(tmp_path, docs, capsys):
    zh_p, en_p = write_corpus(tmp_path/'c', *docs)
    with open(en_p, 'a') as f: f.write('{"text": "good one"}\n{"txt": "typo"}\n{"text": 7}\n')
    n_lines = len(docs[1]) + 3
    with pytest.raises(CorpusError, match=rf'en\.jsonl: line {n_lines - 1}, byte \d+: missing field "text"'):
        prepare_data(zh_p, en_p, tmp_path/'out', vocab_size=VOCAB, workers=1)
    assert not (tmp_path/'out'/'meta.json').exists() and not (tmp_path/'out'/'train.bin').exists()
    r = prepare_data(zh_p, en_p, tmp_path/'out', vocab_size=VOCAB, workers=1, skip_bad=True)
    assert r['sources'][1]['bad'] == 2 and r['sources'][1]['docs'] == len(docs[1]) + 1
    assert r['docs'] == len(docs[0]) + len(docs[1]) + 1
    out = capsys.readouterr().out
    assert '2 bad records skipped' in out and f'line {n_lines - 1}' in out and f'line {n_lines}' in out


def test_bad_arguments(tmp_path, built):
    d, zh_p, en_p, r = built
    with pytest.raises(ValueError, match='zh_ratio must be between 0 and 1'): prepare_data(zh_p, en_p, tmp_path, zh_ratio=1.5)
    with pytest.raises(ValueError, match='zh_ratio needs both'): prepare_data(zh_p, None, tmp_path, zh_ratio=0.5)
    with pytest.raises(ValueError, match='val_fraction'): prepare_data(zh_p, en_p, tmp_path, val_fraction=1.0)
    with pytest.raises(ValueError, match='workers'): prepare_data(zh_p, en_p, tmp_path, workers=0)
    with pytest.raises(ValueError, match='tokenizer_path'): prepare_data(zh_p, en_p, tmp_path, tokenizer_path=tmp_path/'no.model')
    with pytest.raises(CorpusError, match='no such file or directory'): prepare_data(tmp_path/'missing.txt', en_p, tmp_path/'o')
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_one_source(tmp_path, built):
    d, zh_p, en_p, r = built
    m = prepare_data(None, en_p, tmp_path/'en_only', tokenizer_path=d/'out'/'tokenizer.model', workers=1)
    assert [s['name'] for s in m['sources']] == ['en'] and m['docs'] == r['sources'][1]['docs']


def test_failure_midway_leaves_no_finished_build(tmp_path, docs, monkeypatch):
    zh_p, en_p = write_corpus(tmp_path/'c', *docs)
    out = tmp_path/'out'
    r0 = prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1)
    (out/'.train.bin.tmp99999').write_bytes(b'left by a killed run')
    with open(zh_p, 'a') as f: f.write('\n新的一篇。\n')  # inputs change: the old build is stale
    calls = []
    real = C.encode_chunk
    def failing(texts):
        calls.append(1)
        if len(calls) == 3: raise OSError('No space left on device')
        return real(texts)
    monkeypatch.setattr(C, 'encode_chunk', failing)
    monkeypatch.setattr(C, 'CHUNK_CHARS', 2000)
    with pytest.raises(OSError, match='No space left'):
        prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1)
    assert len(calls) == 3
    assert not (out/'meta.json').exists()  # never looks complete
    assert [p.name for p in out.iterdir() if p.name.startswith('.')] == []  # no temporary files, old ones cleaned
    with pytest.raises(ValueError, match='no meta.json'): LazyTextDataset(out, seq_len=8)
    monkeypatch.undo()
    r1 = prepare_data(zh_p, en_p, out, vocab_size=VOCAB, workers=1)
    assert not r1['reused'] and r1['docs'] == r0['docs'] + 1 and (out/'meta.json').exists()
    assert r1['tokenizer']['how'] == 'reused'  # trained before the failure, on these inputs


def _boom(texts): raise RuntimeError('worker failed')


def test_failure_in_a_worker_process(tmp_path, built, monkeypatch):
    "An error inside a pool worker reaches the caller and leaves nothing behind."
    d, zh_p, en_p, r = built
    bad_tok = tmp_path/'tok.model'; shutil.copy(d/'out'/'tokenizer.model', bad_tok)
    monkeypatch.setattr(C, 'CHUNK_CHARS', 2000)
    monkeypatch.setattr(C, 'encode_chunk', _boom)  # forked workers inherit the patched module
    with pytest.raises(RuntimeError, match='worker failed'):
        prepare_data(zh_p, en_p, tmp_path/'out', workers=2, tokenizer_path=bad_tok)
    assert not (tmp_path/'out'/'meta.json').exists()
    assert sorted(p.name for p in (tmp_path/'out').iterdir()) == ['tokenizer.meta.json', 'tokenizer.model']


# ----------------------------------------------------------------------------------------------------------------------
# LazyTextDataset

def ramp_file(path, n, dtype=np.uint16):
    np.arange(n, dtype=np.int64).astype(dtype).tofile(path)
    return path


def test_permute_is_a_permutation():
    for n in (1, 2, 7, 31, 32, 33, 1000, 65_537):
        for e in (0, 1):
            assert np.array_equal(np.sort(permute(np.arange(n), n, epoch_keys(3, e))), np.arange(n))


def test_windows_shift_and_cover(tmp_path):
    p = ramp_file(tmp_path/'r.bin', 1001)
    ds = LazyTextDataset(p, seq_len=10)
    assert (ds.n_windows, len(ds)) == (100, 100)
    seen = []
    for x, y in ds:
        assert x.dtype == torch.int64 and x.shape == (10,) and torch.equal(y, x + 1)
        seen.append(int(x[0]))
    assert sorted(seen) == list(range(0, 1000, 10)) and ds.epoch == 1 and ds.index == 0
    x, y = ds.get_batch(7)
    assert x.shape == y.shape == (7, 10) and torch.equal(y, x + 1) and x.is_contiguous()


def test_determinism(tmp_path):
    p = ramp_file(tmp_path/'r.bin', 5001)
    def order(seed, epoch):
        d = LazyTextDataset(p, 10, seed=seed); d.set_epoch(epoch)
        return [int(x[0]) for x, _ in d]
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(1, 0))


@pytest.mark.parametrize('world_size', [2, 3, 4, 7])
def test_sharding_disjoint_and_covering(tmp_path, world_size):
    p = ramp_file(tmp_path/'r.bin', 1234 * 5 + 3)
    n_windows = (1234 * 5 + 2) // 5
    for epoch in (0, 1):
        per_rank = []
        for rank in range(world_size):
            ds = LazyTextDataset(p, seq_len=5, rank=rank, world_size=world_size, seed=11)
            ds.set_epoch(epoch)
            per_rank.append({int(x[0]) // 5 for x, _ in ds})
            assert len(per_rank[-1]) == len(ds)
        sizes = [len(s) for s in per_rank]
        assert max(sizes) - min(sizes) <= 1
        assert sum(sizes) == len(set().union(*per_rank)) == n_windows  # disjoint, and together all windows
    with pytest.raises(ValueError, match='rank must be in'): LazyTextDataset(p, 5, rank=world_size, world_size=world_size)


def test_dataloader_workers_split_without_overlap(tmp_path):
    p = ramp_file(tmp_path/'r.bin', 641)
    ds = LazyTextDataset(p, seq_len=4, seed=2)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=2)
    starts = torch.cat([x[:, 0] for x, _ in dl]).tolist()
    assert sorted(starts) == list(range(0, 640, 4))


def test_resume_is_exact(tmp_path):
    p = ramp_file(tmp_path/'r.bin', 3001)
    ds = LazyTextDataset(p, seq_len=10, seed=5)
    for _ in range(17): ds.get_batch(8)  # 136 of 300 windows
    sd = ds.state_dict()
    assert (sd['epoch'], sd['index']) == (0, 136)
    ahead = [ds.get_batch(8) for _ in range(30)]  # crosses into epoch 1
    ds2 = LazyTextDataset(p, seq_len=10, seed=5); ds2.load_state_dict(json.loads(json.dumps(sd)))
    for (xa, ya), (xb, yb) in zip(ahead, (ds2.get_batch(8) for _ in range(30))):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert ds.state_dict() == ds2.state_dict() and ds.epoch == 1
    # the iterator resumes too: stop after 5 windows, save, and a fresh dataset continues with the 6th
    ds3 = LazyTextDataset(p, seq_len=10, seed=5); it = iter(ds3)
    first = [next(it)[0] for _ in range(5)]
    sd3 = ds3.state_dict(); assert sd3['index'] == 5
    rest = [x for x, _ in ds3]
    ds4 = LazyTextDataset(p, seq_len=10, seed=5); ds4.load_state_dict(sd3)
    rest4 = [x for x, _ in ds4]
    assert len(first) + len(rest) == 300 and all(torch.equal(a, b) for a, b in zip(rest, rest4)) and len(rest4) == len(rest)


def test_resume_from_another_ranks_state(tmp_path):
    "Ranks in lockstep have used the same number of windows, so rank 0's saved state resumes every rank."
    p = ramp_file(tmp_path/'r.bin', 1001)  # 100 windows over 3 ranks: 34, 33, 33 per epoch
    ranks = [LazyTextDataset(p, seq_len=10, rank=r, world_size=3) for r in range(3)]
    for _ in range(10):
        for d in ranks: d.get_batch(4)  # 40 windows each: rank 0 is at (1, 6), ranks 1 and 2 at (1, 7)
    assert [(d.epoch, d.index) for d in ranks] == [(1, 6), (1, 7), (1, 7)]
    for r in (1, 2):
        fresh = LazyTextDataset(p, seq_len=10, rank=r, world_size=3); fresh.load_state_dict(ranks[0].state_dict())
        assert (fresh.epoch, fresh.index) == (ranks[r].epoch, ranks[r].index)
        assert torch.equal(fresh.get_batch(4)[0], ranks[r].get_batch(4)[0])
    bad = dict(ranks[0].state_dict(), seq_len=20)
    with pytest.raises(ValueError, match='seq_len is 20 in the saved state but 10 here'): ranks[0].load_state_dict(bad)


def test_dataset_on_prepared_folder_and_dtypes(tmp_path, built):
    d, zh_p, en_p, r = built
    ds = LazyTextDataset(d/'out', seq_len=32)
    assert ds.dtype == np.uint16 and ds.n_tokens == r['splits']['train']['tokens']
    x, y = ds.get_batch(4); assert x.max() < VOCAB
    assert LazyTextDataset(d/'out', seq_len=32, split='val').n_tokens == r['splits']['val']['tokens']
    # uint32 token files (vocabularies above 65,536)
    (tmp_path/'u').mkdir()
    np.arange(70_000, 70_000 + 801, dtype=np.uint32).tofile(tmp_path/'u'/'train.bin')
    (tmp_path/'u'/'meta.json').write_text(json.dumps({'dtype': 'uint32'}))
    x, y = LazyTextDataset(tmp_path/'u', seq_len=8).get_batch(3)
    assert int(x.min()) >= 70_000 and torch.equal(y, x + 1)
    with pytest.raises(ValueError, match='fewer than world_size'): LazyTextDataset(tmp_path/'u'/'train.bin', seq_len=800, world_size=2)
    (tmp_path/'odd.bin').write_bytes(b'\0\0\0')
    with pytest.raises(ValueError, match='not a multiple of 2'): LazyTextDataset(tmp_path/'odd.bin', seq_len=1)


def rss_mb():
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmRSS:'): return int(line.split()[1]) / 1024


GIB = 2**30


@pytest.fixture(scope='module')
def huge_file(tmp_path_factory):
    "A 3 GiB uint16 token file, sparse except for 200 regions of known tokens spread across it."
    if not os.path.exists('/proc/self/status'): pytest.skip('needs /proc/self/status to read resident memory')
    d = tmp_path_factory.mktemp('huge')
    size = 3 * GIB
    free = shutil.disk_usage(d).free
    if free < size + GIB: pytest.skip(f'needs {(size + GIB) / GIB:.0f} GiB free in {d} (sparse files may not be supported), has {free / GIB:.1f}')
    p = d/'train.bin'
    with open(p, 'wb') as f: f.truncate(size)
    n = size // 2
    m = np.memmap(p, dtype=np.uint16, mode='r+')
    regions = np.linspace(0, n - 70_000, 200).astype(np.int64)
    for s in regions: m[s:s + 65_536] = (np.arange(s, s + 65_536) % 65_521).astype(np.uint16)  # written, not holes
    m.flush(); del m
    yield p, n, regions
    p.unlink()


def test_memory_does_not_grow_with_the_file(huge_file):
    p, n, regions = huge_file
    T, B = 1024, 64
    ds = LazyTextDataset(p, seq_len=T, seed=0)
    assert ds.n_tokens == n and ds.n_windows == (n - 1) // T  # 1.5B tokens, 1.57M windows
    ds.get_batch(B)
    before = rss_mb()
    checked, lo, hi = 0, n, 0
    for _ in range(20_000 // B):
        starts = ds.window_starts(ds.epoch, range(ds.index, ds.index + B))
        x, y = ds.get_batch(B)  # (B, T)
        lo, hi = min(lo, starts.min()), max(hi, starts.max())
        for s, row in zip(starts, x):
            r = regions[(regions <= s) & (s + T < regions + 65_536)]
            if len(r):  # a window inside a written region: its tokens are the ones written there
                assert torch.equal(row, torch.from_numpy(np.arange(s, s + T) % 65_521)); checked += 1
    grow = rss_mb() - before
    assert grow < 100, f'resident memory grew by {grow:.0f} MB over 20,000 windows'
    assert lo < 0.01 * n and hi > 0.99 * n  # the windows were spread over the whole file
    assert checked > 20


def test_rss_probe_sees_mapped_pages(huge_file):
    "The control: the same reads through one long-lived memmap do grow resident memory, so the test above can fail."
    p, n, regions = huge_file
    m = np.memmap(p, dtype=np.uint16, mode='r')
    starts = np.random.default_rng(0).integers(0, n - 1025, 5000)
    before = rss_mb()
    for s in starts: np.array(m[s:s + 1025])
    assert rss_mb() - before > 100
    del m
