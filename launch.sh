#!/usr/bin/env bash
# Start `python -m kpseq_jax.main` here (one or N local processes) or on every
# worker of a Cloud TPU VM (a single host or a pod slice).
#
#   ./launch.sh [--dry-run] KEY=VALUE ...
#
# Keys (defaults in brackets):
#   target=local|tpu          [local]
#   config=FILE               [configs/default.py]
#   workdir=DIR|gs://...      (required; on a pod: a bucket all hosts share)
#   mode=train|eval           [train]
#   extra='--config.x=y ...'  more flags for kpseq_jax.main (split on spaces)
# local:
#   num_processes=N           [1]; N > 1 starts N processes that join through
#                             a coordinator on localhost:PORT
#   port=PORT                 [12355]
#   cpu_devices=K             simulate K CPU devices per process (XLA_FLAGS)
# tpu:
#   tpu_name=NAME zone=ZONE project=PROJECT   (required)
#   repo=URL                  git clone URL on the workers; default: copy this
#                             checkout there (tar + `gcloud ... scp`)
#   ref=BRANCH|TAG            [main] with repo=
#   remote_dir=DIR            [kpseq_jax], relative to the workers' home
#   install=1|0               [1] create a venv and pip install -r
#                             requirements.txt plus jax[tpu]; 0: run the
#                             workers' own python (already set up)
#
# --dry-run prints the exact commands instead of running them.
#
# Examples:
#   ./launch.sh target=local config=configs/smoke.py workdir=/tmp/run \
#       num_processes=2 cpu_devices=2 extra='--config.sharding.mesh_shape=(2,2)'
#   ./launch.sh target=tpu tpu_name=kp-v4-32 zone=us-central2-b \
#       project=my-proj workdir=gs://my-bucket/runs/mp100_split1 \
#       extra='--config.input.dataset_dir=gs://my-bucket/data/mp100_split1 --config.model_init=/home/me/resnet50.safetensors'
#       (the weights file must be a local path on every host)
set -euo pipefail

dry_run=0
target=local config=configs/default.py workdir='' mode=train extra=''
num_processes=1 port=12355 cpu_devices=''
tpu_name='' zone='' project='' repo='' ref=main remote_dir=kpseq_jax install=1

usage() {  # The header comment above.
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit "${1:-2}"
}

for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    target=*|config=*|workdir=*|mode=*|extra=*|num_processes=*|port=*|\
    cpu_devices=*|tpu_name=*|zone=*|project=*|repo=*|ref=*|remote_dir=*|\
    install=*)
      printf -v "${arg%%=*}" '%s' "${arg#*=}" ;;
    *) echo "launch.sh: unknown argument '$arg'" >&2; usage 2 >&2 ;;
  esac
done

die() { echo "launch.sh: $*" >&2; exit 2; }
[[ -n "$workdir" ]] || die "workdir= is required"
[[ "$mode" == train || "$mode" == eval ]] || die "mode must be train or eval"
[[ "$num_processes" =~ ^[1-9][0-9]*$ ]] || die "num_processes must be >= 1"

# Runs "$@", or prints it shell-quoted with --dry-run.
run() {
  if (( dry_run )); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

read -r -a extra_args <<< "$extra"
main_args=(-m kpseq_jax.main "--config=$config" "--workdir=$workdir"
           "--mode=$mode" ${extra_args[@]+"${extra_args[@]}"})

launch_local() {
  local py=(python)
  [[ -z "$cpu_devices" ]] ||
    py=(env "XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices"
        python)
  if (( num_processes == 1 )); then
    run "${py[@]}" "${main_args[@]}"
    return
  fi
  local pids=() i
  for (( i = 0; i < num_processes; i++ )); do
    if (( dry_run )); then
      run "${py[@]}" "${main_args[@]}" \
        "--coordinator_address=localhost:$port" \
        "--num_processes=$num_processes" "--process_id=$i"
    else
      "${py[@]}" "${main_args[@]}" \
        "--coordinator_address=localhost:$port" \
        "--num_processes=$num_processes" "--process_id=$i" &
      pids+=($!)
    fi
  done
  local status=0 pid
  for pid in ${pids[@]+"${pids[@]}"}; do wait "$pid" || status=$?; done
  return "$status"
}

launch_tpu() {
  [[ -n "$tpu_name" && -n "$zone" && -n "$project" ]] ||
    die "target=tpu needs tpu_name=, zone= and project="
  local gcloud=(gcloud compute tpus tpu-vm)
  local where=(--zone="$zone" --project="$project")
  local fetch
  if [[ -n "$repo" ]]; then
    fetch="rm -rf $(printf '%q' "$remote_dir") && git clone --depth 1 --branch $(printf '%q' "$ref") $(printf '%q' "$repo") $(printf '%q' "$remote_dir")"
  else
    local tarball=/tmp/kpseq_jax_src.tar.gz
    run tar czf "$tarball" --exclude=.git --exclude=./data --exclude=./runs \
      --exclude=.venv --exclude=__pycache__ -C "$(cd "$(dirname "$0")" && pwd)" .
    run "${gcloud[@]}" scp "$tarball" "$tpu_name:kpseq_jax_src.tar.gz" \
      --worker=all "${where[@]}"
    fetch="rm -rf $(printf '%q' "$remote_dir") && mkdir -p $(printf '%q' "$remote_dir") && tar xzf kpseq_jax_src.tar.gz -C $(printf '%q' "$remote_dir")"
  fi
  local setup="cd $(printf '%q' "$remote_dir")"
  if (( install )); then
    # requirements.txt pins the CPU jaxlib; jax[tpu] of the same version adds
    # libtpu.
    setup="$setup && python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt && pip install -q \"jax[tpu]==\$(python -c 'import jax; print(jax.__version__)')\" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  fi
  run "${gcloud[@]}" ssh "$tpu_name" --worker=all "${where[@]}" \
    --command="$fetch && $setup"
  # The fetch above replaced remote_dir: its venv exists only if installed
  # now; with install=0 the workers' own python runs.
  local cmd="cd $(printf '%q' "$remote_dir")"
  (( install )) && cmd="$cmd && . .venv/bin/activate"
  cmd="$cmd && python"
  cmd="$cmd$(printf ' %q' "${main_args[@]}") --distributed=on"
  run "${gcloud[@]}" ssh "$tpu_name" --worker=all "${where[@]}" \
    --command="$cmd"
}

case "$target" in
  local) launch_local ;;
  tpu) launch_tpu ;;
  *) die "target must be local or tpu, got '$target'" ;;
esac
