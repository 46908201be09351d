"The static docs site: every notebook is processed by nbdev, rendered to HTML and linked from index.html."
import json, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT/'nbs'

def _notebooks():
    return sorted(p for p in NBS.rglob('*.ipynb') if not any(o.startswith(('_', '.')) for o in p.relative_to(NBS).parts))

def _title(nb_path):
    "The `# Title` of a notebook's first markdown cell."
    for c in json.loads(nb_path.read_text(encoding='utf-8'))['cells']:
        if c['cell_type'] == 'markdown':
            m = re.search(r'^#\s+(.+)$', ''.join(c['source']), re.M)
            return m.group(1).strip() if m else None

class _Site(type(Path())): pass   # a Path that also carries the builder's stderr

@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = _Site(tmp_path_factory.mktemp('site'))
    r = subprocess.run([sys.executable, 'scripts/build_docs.py', str(out), '--proc-dir', str(out/'_proc')], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'-> {out}' in r.stdout
    out.stderr = r.stderr
    return out

def test_every_notebook_is_linked_and_rendered(site):
    index = (site/'index.html').read_text(encoding='utf-8')
    nbs = _notebooks()
    assert len(nbs) >= 2
    for nb in nbs:
        rel = nb.relative_to(NBS).as_posix()
        page = 'index.html' if rel == 'index.ipynb' else rel[:-len('.ipynb')].replace('/', '_') + '.html'
        assert (site/page).is_file(), page
        assert f'href="{page}"' in index, f'{rel} is not linked from index.html'
        assert f'<code>{rel}</code>' in index, rel
        title = _title(nb)
        assert title, f'{rel} has no "# Title" markdown cell'
        assert title in (site/page).read_text(encoding='utf-8'), (rel, title)
        assert title in index, (rel, title)

def test_contents_in_reading_order(site):
    index = (site/'index.html').read_text(encoding='utf-8')
    toc = index[index.index('id="contents"'):]
    pos = [toc.index(f'<code>{p.relative_to(NBS).as_posix()}</code>') for p in _notebooks() if p.name != 'index.ipynb']
    assert pos == sorted(pos)

def test_nbdev_processes_every_notebook(site):
    "nbdev's doc processing (which runs every cell that imports something) works on every notebook, as nbdev-docs needs."
    bad = [l for l in site.stderr.splitlines() if 'could not process' in l]
    assert not bad, 'split these cells so imports stand alone:\n' + '\n'.join(bad)

def test_pages_are_processed_docs(site):
    "nbdev's processing ran: exported functions appear as signatures with their docments; hidden cells are gone."
    core = (site/'00_core.html').read_text(encoding='utf-8')
    assert 'get_device' in core and 'pick the best available' in core   # show_doc of an exported function
    assert 'from nbdev.showdoc import' not in core                      # a `#| hide` cell
    assert '#| export' not in core and '#| default_exp' not in core
    assert 'metai: contents' in core                                    # the nav bar back to the index

_re_row = re.compile(r'^\|[ \t]*[\w–-]+[ \t]*\|[ \t]*([^|\n]+?)[ \t]*\|[^\n]*\|[ \t]*(available|planned)[ \t]*\|[ \t]*$', re.M)

def _path_status(text):
    "{notebook file name: status} from a learning-path table; planned rows have no link."
    rows = {}
    for name, status in _re_row.findall(text):
        m = re.search(r'\]\((?:nbs/)?([^)]+\.ipynb)\)', name)
        rows[m.group(1) if m else name] = status
    return rows

def test_learning_path_is_honest():
    "index.ipynb and README.md mark exactly the notebooks that exist as available, and agree with each other."
    index = '\n'.join(''.join(c['source']) for c in json.loads((NBS/'index.ipynb').read_text(encoding='utf-8'))['cells']
                    if c['cell_type'] == 'markdown')
    readme = (ROOT/'README.md').read_text(encoding='utf-8')
    on_disk = {p.name for p in _notebooks() if p.name != 'index.ipynb'}
    for name, text in [('nbs/index.ipynb', index), ('README.md', readme)]:
        rows = _path_status(text)
        avail = {k for k,v in rows.items() if v == 'available'}
        assert avail == on_disk, f'{name}: marked available {sorted(avail - on_disk)} but missing; present but not marked available {sorted(on_disk - avail)}'
    assert _path_status(index) == _path_status(readme), 'README.md and nbs/index.ipynb disagree on the learning path'

def test_no_slow_cell_runs_while_the_docs_build():
    """nbdev's doc processing runs every cell whose code holds an import anywhere (even inside a function): a `#| slow` or
    `#| cuda` cell doing so, beyond the imports, would run while the docs build (one that trained models cost them 147 s)."""
    import ast
    bad = []
    for nb in _notebooks():
        for i, c in enumerate(json.loads(nb.read_text(encoding='utf-8'))['cells']):
            src = ''.join(c['source'])
            flags = set(re.findall(r'^#\|\s*(slow|cuda)\s*$', src, re.M))
            if c['cell_type'] != 'code' or not flags or re.search(r'^#\|\s*eval:\s*false', src, re.M): continue
            code = '\n'.join(l for l in src.splitlines() if not l.lstrip().startswith(('%', '!')))
            tree, imp = ast.parse(code), (ast.Import, ast.ImportFrom)
            if any(isinstance(n, imp) for n in ast.walk(tree)) and not all(isinstance(n, imp) for n in tree.body):  # imports alone: cheap
                bad.append(f'{nb.name} cell {i} (#| {", ".join(sorted(flags))})')
    assert not bad, 'move these imports into an import cell of their own:\n' + '\n'.join(bad)
