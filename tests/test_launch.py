"""What `launch.sh` does, run against fake ``python``, ``gcloud`` and ``git``.

The fakes (on PATH ahead of the real ones) record their argv, working
directory and environment; the fake ``gcloud`` plays a TPU VM of two
workers: ``scp ... --worker=all`` copies into each worker's home,
``ssh ... --worker=all --command=CMD`` runs CMD with bash in each. So
the tests check what reaches each worker (the source, the install, the
training command), not how launch.sh spells it.
"""

import json
import os
from pathlib import Path
import stat
import subprocess

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / 'launch.sh'
WORKERS = 2

# Records one call as a JSON line in $RECORD: argv, cwd, XLA_FLAGS.
_RECORD = '''
python3 - "$@" <<'EOF' >> "$RECORD"
import json, os, sys
print(json.dumps(dict(prog=os.path.basename(os.environ['PROG']),
                      argv=sys.argv[1:], cwd=os.getcwd(),
                      xla_flags=os.environ.get('XLA_FLAGS'))))
EOF
'''

FAKES = {
    # python -c: the jax version pip asks for; python -m venv: a venv whose
    # activate keeps the fakes first; else record, and fail for
    # --process_id=$FAIL_PROCESS.
    'python': '''
if [[ "${1:-}" == -c ]]; then echo 0.4.99; exit 0; fi
export PROG=python''' + _RECORD + '''
for a in "$@"; do
  [[ "$a" == "--process_id=${FAIL_PROCESS:-none}" ]] && exit 3
done
exit 0
''',
    'python3': '''
if [[ "${1:-}" == -m && "${2:-}" == venv ]]; then
  mkdir -p "$3/bin" && echo 'true' > "$3/bin/activate"; exit 0
fi
exec /usr/bin/python3 "$@"
''',
    'pip': 'export PROG=pip' + _RECORD,
    'git': '''export PROG=git''' + _RECORD + '''
[[ "$1" == clone ]] && mkdir -p "${@: -1}"
exit 0
''',
    'gcloud': '''export PROG=gcloud''' + _RECORD + '''
args=("$@"); op=${args[3]}
cmd=''
for a in "$@"; do [[ "$a" == --command=* ]] && cmd=${a#--command=}; done
for (( w = 0; w < WORKERS; w++ )); do
  home="$FAKE_TPU/worker$w"; mkdir -p "$home"
  if [[ "$op" == scp ]]; then
    cp "${args[4]}" "$home/${args[5]#*:}"
  elif [[ "$op" == ssh ]]; then
    (cd "$home" && HOME="$home" bash -c "$cmd") || exit $?
  fi
done
''',
}


@pytest.fixture
def fakes(tmp_path):
  """(environment with the fakes first on PATH, records reader)."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for name, body in FAKES.items():
    path = bin_dir / name
    path.write_text('#!/usr/bin/env bash\nset -euo pipefail\n' + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
  record = tmp_path / 'calls.jsonl'
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}',
             RECORD=str(record), FAKE_TPU=str(tmp_path / 'tpu'),
             WORKERS=str(WORKERS))
  env.pop('XLA_FLAGS', None)

  def calls(prog=None):
    if not record.exists():
      return []
    out = [json.loads(l) for l in record.read_text().splitlines()]
    return [c for c in out if prog in (None, c['prog'])]
  return env, calls


def launch(env, *args, check=True):
  return subprocess.run(['bash', str(LAUNCH), *args], env=env, cwd=REPO,
                        capture_output=True, text=True, check=check)


def test_local_processes_join_one_coordinator(fakes):
  env, calls = fakes
  launch(env, 'config=configs/smoke.py', 'workdir=/tmp/run',
         'num_processes=3', 'cpu_devices=2', 'port=4321',
         'extra=--config.optim.num_train_steps=5 '
         '--config.sharding.mesh_shape=(2,2)')
  runs = sorted(calls('python'), key=lambda c: c['argv'][-1])
  assert len(runs) == 3
  for i, run in enumerate(runs):
    argv = run['argv']
    assert argv[:2] == ['-m', 'kpseq_jax.main']
    for flag in ('--config=configs/smoke.py', '--workdir=/tmp/run',
                 '--mode=train', '--config.optim.num_train_steps=5',
                 '--config.sharding.mesh_shape=(2,2)',
                 '--coordinator_address=localhost:4321',
                 '--num_processes=3', f'--process_id={i}'):
      assert argv.count(flag) == 1, (flag, argv)
    assert run['xla_flags'] == '--xla_force_host_platform_device_count=2'


def test_one_local_process_runs_the_defaults_without_coordinator(fakes):
  env, calls = fakes
  launch(env, 'workdir=w', 'mode=eval')
  [run] = calls('python')
  assert run['argv'] == ['-m', 'kpseq_jax.main', '--config=configs/default.py',
                         '--workdir=w', '--mode=eval']
  assert run['xla_flags'] is None


def test_a_failing_local_process_fails_the_launch(fakes):
  env, calls = fakes
  env['FAIL_PROCESS'] = '1'
  r = launch(env, 'workdir=w', 'num_processes=2', check=False)
  assert r.returncode == 3
  assert len(calls('python')) == 2  # The other process still ran.


def test_tpu_copies_this_checkout_installs_and_trains_on_every_worker(fakes):
  env, calls = fakes
  launch(env, 'target=tpu', 'tpu_name=kp-v4-32', 'zone=us-central2-b',
         'project=proj', 'workdir=gs://bucket/run',
         'extra=--config.input.dataset_dir=gs://bucket/data '
         '--config.sharding.mesh_shape=(4,4)')
  for call in calls('gcloud'):
    argv = call['argv']
    assert argv[:3] == ['compute', 'tpus', 'tpu-vm'], argv
    for flag in ('--worker=all', '--zone=us-central2-b', '--project=proj'):
      assert flag in argv, (flag, argv)
  runs = calls('python')
  assert len(runs) == WORKERS
  for w, run in enumerate(sorted(runs, key=lambda c: c['cwd'])):
    home = Path(env['FAKE_TPU']) / f'worker{w}'
    assert run['cwd'] == str(home / 'kpseq_jax')
    # This checkout's files, unpacked there, without its .git.
    assert (home / 'kpseq_jax' / 'launch.sh').read_bytes() == (
        LAUNCH.read_bytes())
    assert (home / 'kpseq_jax' / 'kpseq_jax' / 'main.py').exists()
    assert not (home / 'kpseq_jax' / '.git').exists()
    assert (home / 'kpseq_jax' / '.venv' / 'bin' / 'activate').exists()
    assert run['argv'] == [
        '-m', 'kpseq_jax.main', '--config=configs/default.py',
        '--workdir=gs://bucket/run', '--mode=train',
        '--config.input.dataset_dir=gs://bucket/data',
        '--config.sharding.mesh_shape=(4,4)',
        '--distributed=on']
  installs = [c['argv'] for c in calls('pip')]
  assert installs.count(['install', '-q', '-r', 'requirements.txt']) == WORKERS
  # libtpu for the jax version requirements.txt installed.
  tpu = [a for a in installs if 'jax[tpu]==0.4.99' in a]
  assert len(tpu) == WORKERS


def test_tpu_from_a_git_repository_without_install(fakes):
  env, calls = fakes
  launch(env, 'target=tpu', 'tpu_name=t', 'zone=z', 'project=p',
         'workdir=gs://b/r', 'repo=https://example.com/k.git', 'ref=v1',
         'remote_dir=src', 'install=0')
  clones = [c['argv'] for c in calls('git')]
  assert clones == [['clone', '--depth', '1', '--branch', 'v1',
                     'https://example.com/k.git', 'src']] * WORKERS
  assert not calls('pip')
  assert not [c for c in calls('gcloud') if c['argv'][3] == 'scp']
  assert {Path(c['cwd']).name for c in calls('python')} == {'src'}


@pytest.mark.parametrize('args, message', [
    (['target=tpu', 'workdir=w'], 'tpu_name=, zone= and project='),
    (['bogus=1', 'workdir=w'], "unknown argument 'bogus=1'"),
    ([], 'workdir= is required'),
    (['workdir=w', 'target=gpu'], "target must be local or tpu, got 'gpu'"),
    (['workdir=w', 'mode=x'], 'mode must be train or eval'),
    (['workdir=w', 'num_processes=0'], 'num_processes must be >= 1'),
])
def test_bad_arguments_fail_before_running_anything(fakes, args, message):
  env, calls = fakes
  r = launch(env, *args, check=False)
  assert r.returncode == 2 and message in r.stderr and r.stdout == ''
  assert calls() == []


def test_dry_run_runs_nothing_and_prints_each_command(fakes):
  env, calls = fakes
  r = launch(env, '--dry-run', 'workdir=w', 'num_processes=2')
  assert calls() == []
  lines = r.stdout.splitlines()
  assert len(lines) == 2 and all('kpseq_jax.main' in l for l in lines)
