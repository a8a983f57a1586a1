#!/usr/bin/env bash
# One GPU machine (one or more GPUs): virtualenv, CUDA JAX, the whole pipeline.
set -euo pipefail

HERE="$(cd "${BASH_SOURCE[0]%/*}" && pwd)"
REPO="${HERE%/*}"
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

usage() {
  local text  # no external program (cat), so --help and --dry-run run with an empty PATH
  IFS= read -r -d '' text <<EOF || true
Usage: launch/gpu_host.sh [options] [-- --config.FIELD=VALUE ...]

Run on the GPU machine itself, from a checkout of this repository: creates a virtualenv,
installs fmcejax with CUDA JAX (pip install -e '.[cuda]'), checks that JAX sees a GPU and runs
'python -m fmcejax.train'. Every GPU of the machine is used (data parallel); batch_size and
eval_batch_size must be multiples of the GPU count.

Resume: run the same command again. Finished stages are skipped and an interrupted stage
continues from its last checkpoint (Ctrl-C or SIGTERM checkpoint first; a kill -9 loses at most
the steps since the last checkpoint, see --config.checkpoint_every_steps).

Options:
  --config FILE     config file (default: configs/mnist_cnn.py)
  --workdir DIR     results, checkpoints, TensorBoard logs (default: ./workdir)
  --venv DIR        virtualenv to create or reuse (default: .venv-gpu in the repository)
  --python PY       interpreter the virtualenv is made from, Python >= 3.11 (default: python3)
  --skip-install    use the virtualenv as it is (no pip)
  --dry-run         print every command instead of running it (same as DRY_RUN=1)
  -h, --help        this text
Everything after '--' goes to the CLI unchanged, e.g. -- --config.epochs=30 --config.seeds=3

Example:
  launch/gpu_host.sh --config configs/cifar10_resnet18.py --workdir /data/runs/c10 -- --config.seeds=3
EOF
  printf '%s' "$text"
}

CONFIG="configs/mnist_cnn.py"
WORKDIR="./workdir"
VENV="$REPO/.venv-gpu"
PYTHON="python3"
INSTALL=1
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --skip-install) INSTALL=0 ;;
    --config|--workdir|--venv|--python)
      [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
      case "$1" in
        --config) CONFIG="$2" ;; --workdir) WORKDIR="$2" ;;
        --venv) VENV="$2" ;; --python) PYTHON="$2" ;;
      esac
      shift ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done

run cd "$REPO"
if [[ "$INSTALL" == 1 ]]; then
  if [[ ! -x "$VENV/bin/python" ]]; then
    need "$PYTHON" "Install Python >= 3.11 or pass --python."
    if [[ "$DRY_RUN" != 1 ]] && ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
      die "$PYTHON is older than 3.11; pass --python python3.11 (or make one with 'uv python install 3.11')."
    fi
    run "$PYTHON" -m venv "$VENV"
  fi
  run "$VENV/bin/pip" install --upgrade pip
  run "$VENV/bin/pip" install -e '.[cuda]'
fi
run "$VENV/bin/python" -c 'import jax; d = jax.devices(); print(d); assert d[0].platform == "gpu", "JAX sees no GPU"'
run "$VENV/bin/python" -m fmcejax.train --config "$CONFIG" --workdir "$WORKDIR" ${EXTRA[@]+"${EXTRA[@]}"}
