"""`launch.sh --dry-run` prints the exact commands it would run."""

from pathlib import Path
import shlex
import subprocess

LAUNCH = Path(__file__).resolve().parents[1] / 'launch.sh'


def dry_run(*args: str) -> list[list[str]]:
  out = subprocess.run(['bash', str(LAUNCH), '--dry-run', *args],
                       capture_output=True, text=True, check=True).stdout
  return [shlex.split(line) for line in out.splitlines()]


def option(cmd: list[str], name: str) -> str:
  [value] = [a.split('=', 1)[1] for a in cmd if a.startswith(name + '=')]
  return value


def test_tpu_copies_installs_and_runs_on_every_worker():
  cmds = dry_run('target=tpu', 'tpu_name=kp-v4-32', 'zone=us-central2-b',
                 'project=proj', 'workdir=gs://bucket/run',
                 "extra=--config.input.dataset_dir=gs://bucket/data "
                 "--config.sharding.mesh_shape=(4,4)")
  tar, scp, install, train = cmds
  assert tar[:2] == ['tar', 'czf'] and '--exclude=.git' in tar
  assert scp[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp']
  assert tar[2] == scp[5] and scp[6] == 'kp-v4-32:kpseq_jax_src.tar.gz'
  for cmd in (scp, install, train):
    assert '--worker=all' in cmd
    assert option(cmd, '--zone') == 'us-central2-b'
    assert option(cmd, '--project') == 'proj'
  assert install[4:6] == ['ssh', 'kp-v4-32']
  setup = option(install, '--command')
  assert 'tar xzf kpseq_jax_src.tar.gz -C kpseq_jax' in setup
  assert 'pip install -q -r requirements.txt' in setup
  assert 'jax[tpu]' in setup
  remote = shlex.split(option(train, '--command'))
  assert remote[:6] == ['cd', 'kpseq_jax', '&&', '.', '.venv/bin/activate',
                        '&&']
  assert remote[6:] == [
      'python', '-m', 'kpseq_jax.main', '--config=configs/default.py',
      '--workdir=gs://bucket/run', '--mode=train',
      '--config.input.dataset_dir=gs://bucket/data', '--config.sharding.mesh_shape=(4,4)',
      '--distributed=on']


def test_tpu_from_a_git_repository():
  install = dry_run('target=tpu', 'tpu_name=t', 'zone=z', 'project=p',
                    'workdir=gs://b/r', 'repo=https://example.com/k.git',
                    'ref=v1')[0]
  assert 'git clone --depth 1 --branch v1 https://example.com/k.git ' \
         'kpseq_jax' in option(install, '--command')


def test_local_processes_share_one_coordinator():
  cmds = dry_run('config=configs/smoke.py', 'workdir=/tmp/run',
                 'num_processes=2', 'cpu_devices=2', 'port=4321')
  assert len(cmds) == 2
  for i, cmd in enumerate(cmds):
    assert cmd[:3] == ['env',
                       'XLA_FLAGS=--xla_force_host_platform_device_count=2',
                       'python']
    assert cmd[3:8] == ['-m', 'kpseq_jax.main', '--config=configs/smoke.py',
                        '--workdir=/tmp/run', '--mode=train']
    assert cmd[8:] == ['--coordinator_address=localhost:4321',
                       '--num_processes=2', f'--process_id={i}']
  assert dry_run('workdir=w') == [
      ['python', '-m', 'kpseq_jax.main', '--config=configs/default.py',
       '--workdir=w', '--mode=train']]


def test_bad_arguments_fail_before_running_anything():
  for args in (['target=tpu', 'workdir=w'], ['bogus=1', 'workdir=w'],
               [], ['workdir=w', 'target=gpu'], ['workdir=w', 'mode=x']):
    r = subprocess.run(['bash', str(LAUNCH), '--dry-run', *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == '' and 'launch.sh' in r.stderr
