# shellcheck shell=bash
# The body of tpu_vm.sh and tpu_pod.sh (sourced after they set MODE=vm|pod). Not run directly.

HERE="$(cd "${BASH_SOURCE[0]%/*}" && pwd)"
REPO="${HERE%/*}"
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

case "$MODE" in
  vm) DEFAULT_ACCEL="v5litepod-8"; WHAT="one Cloud TPU VM (a single-host slice)" ;;
  pod) DEFAULT_ACCEL="v5litepod-16"; WHAT="a Cloud TPU pod slice (several hosts, one process each)" ;;
  *) die "MODE must be vm or pod" ;;
esac

usage() {
  local text  # no external program (cat), so --help and --dry-run run with an empty PATH
  IFS= read -r -d '' text <<EOF || true
Usage: launch/tpu_$MODE.sh [options] COMMAND [-- --config.FIELD=VALUE ...]

Runs the FMCE-Net++ pipeline on $WHAT, driving gcloud from this machine.
Commands (each step on every worker of the slice):
  create    create the TPU (a PREEMPTED/TERMINATED one of that name is deleted first;
            a READY one is reused)
  setup     upload this checkout (or git clone --repo-url), make a Python 3.11 virtualenv with
            uv, pip install -e '.[tpu,gcs]', copy the --data
  run       python -m fmcejax.train on every worker at once (JAX finds the other hosts itself)
  logs      last lines of each worker's log (after run --detach)
  fetch     copy the workdir (results, plots, TensorBoard logs) to --results
  delete    delete the TPU
  status    show the TPU's state (READY, PREEMPTED, ...)
  all       create, setup, run; then fetch and delete (not with --detach)

Resume after a preemption or any interruption: run the same command again. 'create' replaces
a preempted TPU, 'setup' reinstalls, and 'run' finds the workdir on the bucket: finished stages
are skipped and the interrupted one continues from its last checkpoint (SIGTERM, the preemption
notice, makes the trainer checkpoint first; use --detach so an ssh hang-up cannot kill it).

Options:
  --zone ZONE              zone of the TPU (default: \$TPU_ZONE) [required]
  --project PROJECT        Google Cloud project (default: gcloud's configured project)
  --name NAME              TPU name (default: fmcejax-$MODE)
  --accelerator-type TYPE  slice type (default: $DEFAULT_ACCEL)
  --version VERSION        TPU software version (default: v2-alpha-tpuv5-lite, for v5e)
  --spot | --preemptible   cheaper capacity that can be preempted (then resume as above)
  --bucket gs://B[/PREFIX] keep the workdir in this bucket: --workdir gs://B/PREFIX/RUN_NAME,
                           written through etils.epath and Orbax$([[ "$MODE" == pod ]] && printf ' [required: every host\n                           must see the same workdir]')
  --run-name NAME          workdir subdirectory (default: the TPU name)
  --data SRC               dataset archives (e.g. SRC/mnist/*-ubyte.gz): a gs:// folder
                           or a local folder, copied to every worker
  --config FILE            config file, relative to the repository (default: configs/mnist_cnn.py)
  --repo-url URL           git clone URL instead of uploading this checkout
  --results DIR            where 'fetch' puts the workdir (default: ./results)
  --detach                 'run' starts the job in the background (nohup) and returns
  --dry-run                print every command instead of running it (same as DRY_RUN=1)
  -h, --help               this text
Everything after '--' goes to the CLI unchanged, e.g. -- --config.epochs=30 --config.seeds=3

Example:
  launch/tpu_$MODE.sh --zone us-west4-a --spot --bucket gs://my-bucket/fmcejax \\
      --data gs://my-bucket/data --config configs/cifar10_resnet18.py all
EOF
  printf '%s' "$text"
}

ZONE="${TPU_ZONE:-}"
PROJECT=""
NAME="fmcejax-$MODE"
ACCEL="$DEFAULT_ACCEL"
VERSION="v2-alpha-tpuv5-lite"
CAPACITY=""
BUCKET=""
RUN_NAME=""
DATA=""
CONFIG="configs/mnist_cnn.py"
REPO_URL=""
RESULTS="./results"
DETACH=0
COMMAND=""
EXTRA=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --spot|--preemptible) CAPACITY="$1" ;;
    --detach) DETACH=1 ;;
    --zone|--project|--name|--accelerator-type|--version|--bucket|--run-name|--data|--config|\
    --repo-url|--results)
      [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
      set -- "$1=$2" "${@:3}"
      continue ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --name=*) NAME="${1#*=}" ;;
    --accelerator-type=*) ACCEL="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --bucket=*) BUCKET="${1#*=}" ;;
    --run-name=*) RUN_NAME="${1#*=}" ;;
    --data=*) DATA="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --repo-url=*) REPO_URL="${1#*=}" ;;
    --results=*) RESULTS="${1#*=}" ;;
    create|setup|run|logs|fetch|delete|status|all)
      [[ -z "$COMMAND" ]] || die "one command at a time (got '$COMMAND' and '$1')"
      COMMAND="$1" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done

[[ -n "$COMMAND" ]] || { usage >&2; die "no COMMAND given"; }
[[ -n "$ZONE" ]] || die "--zone is required (or set TPU_ZONE)"
[[ -z "$BUCKET" || "$BUCKET" == gs://?* ]] || die "--bucket must look like gs://BUCKET[/PREFIX], got '$BUCKET'"
if [[ "$MODE" == pod && -z "$BUCKET" && "$COMMAND" != delete && "$COMMAND" != status ]]; then
  die "a pod slice needs --bucket gs://...: every host must read and write the same workdir"
fi
RUN_NAME="${RUN_NAME:-$NAME}"
need gcloud "Install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install"

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
[[ -z "$PROJECT" ]] || WHERE+=("--project=$PROJECT")

# On the workers: everything lives in the home directory. Shell snippets use $HOME (single-
# quoted here, so it expands there); the training command runs in ~/fmcejax and names the others
# relative to it, so its words need no remote expansion.
# shellcheck disable=SC2016  # $HOME is for the worker's shell
{
  R_SRC='$HOME/fmcejax'
  R_VENV='$HOME/fmcejax-venv'
  R_DATA='$HOME/fmcejax-data'
  R_LOG='$HOME/fmcejax-run.log'
}
if [[ -n "$BUCKET" ]]; then
  WORKDIR="${BUCKET%/}/$RUN_NAME"
else
  WORKDIR="../fmcejax-work/$RUN_NAME"
fi

on_workers() {  # on_workers COMMAND_STRING: runs it on every worker over ssh
  run "${GCLOUD_TPU[@]}" ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

tpu_state() {  # prints the TPU's state, or nothing if there is no such TPU
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(quote "${GCLOUD_TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)')"
    printf '# dry run: assuming no TPU named %s exists yet\n' "$NAME"
    return 0
  fi
  "${GCLOUD_TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state)' 2>/dev/null || true
}

cmd_create() {
  local state
  state="$(tpu_state)"
  if [[ "$DRY_RUN" == 1 ]]; then printf '%s\n' "$state"; state=""; fi
  case "$state" in
    READY) note "TPU $NAME exists and is READY: reusing it"; return 0 ;;
    "") ;;
    *) note "TPU $NAME is $state (preempted or stopped): deleting it to create it again"
       run "${GCLOUD_TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet ;;
  esac
  local create=("${GCLOUD_TPU[@]}" create "$NAME" "${WHERE[@]}" "--accelerator-type=$ACCEL"
                "--version=$VERSION" --scopes=https://www.googleapis.com/auth/cloud-platform)
  [[ -z "$CAPACITY" ]] || create+=("$CAPACITY")
  run "${create[@]}"
}

cmd_setup() {
  if [[ -n "$REPO_URL" ]]; then
    on_workers "set -e; if [ -d $R_SRC/.git ]; then git -C $R_SRC pull --ff-only; else rm -rf $R_SRC; git clone $(quote "$REPO_URL") $R_SRC; fi"
  else
    local tarball="${TMPDIR:-/tmp}/fmcejax-src-$NAME.tgz"
    # Tracked and untracked-but-not-ignored files: the working tree as it is, without .venv etc.
    run bash -c "cd $(quote "$REPO") && git ls-files -co --exclude-standard -z | tar --null -T - -czf $(quote "$tarball")"
    run "${GCLOUD_TPU[@]}" scp "$tarball" "$NAME:fmcejax-src.tgz" "${WHERE[@]}" --worker=all
    on_workers "set -e; rm -rf $R_SRC; mkdir -p $R_SRC; tar -xzf \$HOME/fmcejax-src.tgz -C $R_SRC"
  fi
  # TPU VM images ship Python 3.10; uv provides 3.11 (a system python3.11 if there is one).
  on_workers "set -e; cd $R_SRC; if [ ! -x $R_VENV/bin/python ]; then python3 -m pip install --user --quiet uv; \$HOME/.local/bin/uv venv --seed --python 3.11 $R_VENV; fi; $R_VENV/bin/pip install --quiet -e \".[tpu,gcs]\"; $R_VENV/bin/python -c \"import fmcejax, jax; print('fmcejax ready, jax', jax.__version__)\""
  if [[ "$DATA" == gs://* ]]; then
    on_workers "set -e; mkdir -p $R_DATA; gcloud storage rsync -r $(quote "$DATA") $R_DATA"
  elif [[ -n "$DATA" ]]; then
    [[ "$DRY_RUN" == 1 || -d "$DATA" ]] || die "--data $DATA: no such folder"
    on_workers "rm -rf $R_DATA"
    run "${GCLOUD_TPU[@]}" scp --recurse "$DATA" "$NAME:fmcejax-data" "${WHERE[@]}" --worker=all
  fi
}

cmd_run() {
  # Runs in ~/fmcejax on every worker; a pod's hosts find each other (jax.distributed).
  local train=(../fmcejax-venv/bin/python -m fmcejax.train --config "$CONFIG" --workdir "$WORKDIR"
               --config.tfds_data_dir=../fmcejax-tfds)
  [[ -z "$DATA" ]] || train+=(--config.data_dir=../fmcejax-data)
  train+=(${EXTRA[@]+"${EXTRA[@]}"})
  local line prefix="set -e; " env=""
  line="$(quote "${train[@]}")"
  # Several hosts: jax.distributed.initialize() with no arguments (fmcejax/parallel.py).
  [[ "$MODE" != pod ]] || env="FMCEJAX_DISTRIBUTED=auto "
  if [[ "$DETACH" == 1 ]]; then
    on_workers "${prefix}cd $R_SRC; ${env}nohup setsid $line > $R_LOG 2>&1 < /dev/null & echo \"started; log in $R_LOG\""
  else
    on_workers "${prefix}cd $R_SRC; $env$line"
  fi
}

cmd_logs() {
  on_workers "tail -n 20 $R_LOG"
}

cmd_fetch() {
  run mkdir -p "$RESULTS"
  if [[ -n "$BUCKET" ]]; then
    run gcloud storage rsync -r "${BUCKET%/}/$RUN_NAME" "$RESULTS/$RUN_NAME"
  else
    run "${GCLOUD_TPU[@]}" scp --recurse "$NAME:fmcejax-work/$RUN_NAME" "$RESULTS/" "${WHERE[@]}" --worker=0
  fi
  note "results in $RESULTS/$RUN_NAME (report.md, report.json, plots, */metrics.json, TensorBoard logs)"
}

cmd_delete() {
  run "${GCLOUD_TPU[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

cmd_status() {
  run "${GCLOUD_TPU[@]}" describe "$NAME" "${WHERE[@]}" --format='value(state,acceleratorType,health)'
}

case "$COMMAND" in
  all)
    cmd_create
    cmd_setup
    cmd_run
    if [[ "$DETACH" == 1 ]]; then
      note "running in the background: 'logs' to follow it, then 'fetch' and 'delete'"
    else
      cmd_fetch
      cmd_delete
    fi ;;
  *) "cmd_$COMMAND" ;;
esac
