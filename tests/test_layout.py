"""The package's folders are the stages of the data flow, in order.

A module may import modules of its own stage or of earlier ones, never of
a later one, so that each stage can be read, tested and reused without
the ones after it (README "Map of the code").
"""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# kpseq_jax sub-packages in data-flow order; the modules directly in
# kpseq_jax/ (main, train, benchmark) come after all of them.
STAGES = ('runtime', 'sequence', 'data', 'models', 'training', 'inference',
          'evaluation')
TOP = len(STAGES)


def stage_of(module: str) -> int | None:
  """Stage index of a dotted module name; None outside kpseq_jax."""
  parts = module.split('.')
  if parts[0] != 'kpseq_jax':
    return None
  if len(parts) == 1:
    return -1  # The package itself (its __init__ imports nothing).
  if parts[1] in STAGES:
    return STAGES.index(parts[1])
  return TOP


def imported_modules(path: Path) -> set[str]:
  """Every module a file imports, at any depth (functions included);
  ``from a import b`` counts as ``a.b`` (b may be a module)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.update(f'{node.module}.{a.name}' for a in node.names)
  return out


def _module_name(path: Path) -> str:
  rel = path.relative_to(REPO).with_suffix('')
  parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
  return '.'.join(parts)


def _sources(package: str) -> list[Path]:
  return sorted((REPO / package).rglob('*.py'))


def _edges(package: str):
  for path in _sources(package):
    for target in imported_modules(path):
      yield _module_name(path), target


def test_every_stage_folder_exists_and_nothing_is_left_flat():
  flat = {p.stem for p in (REPO / 'kpseq_jax').glob('*.py')}
  assert flat == {'__init__', 'main', 'train', 'benchmark'}
  for stage in STAGES:
    assert (REPO / 'kpseq_jax' / stage / '__init__.py').exists(), stage


def test_no_module_imports_a_later_stage():
  late = []
  for source, target in _edges('kpseq_jax'):
    s, t = stage_of(source), stage_of(target)
    if t is not None and t > s:
      late.append(f'{source} imports {target}')
  assert not late, '\n'.join(late)


@pytest.mark.parametrize('package', ['data_prep', 'configs'])
def test_data_prep_and_configs_do_not_import_the_package(package):
  assert not [f'{s} imports {t}' for s, t in _edges(package)
              if stage_of(t) is not None]


def test_the_checker_sees_a_late_import(tmp_path):
  """The rule's own machinery: a data module importing evaluation is
  reported, a models module importing data is not."""
  assert stage_of('kpseq_jax.data.transforms') < stage_of(
      'kpseq_jax.evaluation.metrics') < stage_of('kpseq_jax.train')
  f = tmp_path / 'm.py'
  f.write_text('def f():\n  from kpseq_jax.evaluation import metrics\n'
               'import kpseq_jax.data.dataset\n')
  assert imported_modules(f) == {'kpseq_jax.evaluation.metrics',
                                 'kpseq_jax.data.dataset'}
