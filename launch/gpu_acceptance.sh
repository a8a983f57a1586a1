#!/usr/bin/env bash
# One call on one GPU machine: the train-step benchmarks, the loop ceiling and a short pipeline.
set -euo pipefail

HERE="$(cd "${BASH_SOURCE[0]%/*}" && pwd)"
REPO="${HERE%/*}"
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

usage() {
  local text
  IFS= read -r -d '' text <<EOF || true
Usage: launch/gpu_acceptance.sh OUTDIR [options]

Run on a GPU machine (one H200: about 8 minutes; every step has a time cap) from a checkout of
this repository, with no network: installs what the machine lacks from the bundle of
launch/make_gpu_bundle.sh (pip --no-index), then measures and writes JSON under OUTDIR:
  bench_resnet18.json, bench_resnet50.json  python -m fmcejax.bench, bf16, batch 512: baseline
                      and RAL steps, JAX against torch eager and torch.compile, MFU
  loop.json           python -m fmcejax.bench_loop: the loop ceiling at batch 128 and 512, and
                      the step rate ResNet-18/50 need at 35% MFU
  train.json          every stage's metrics of a short 'python -m fmcejax.train' on
                      cifar10_jpeg (resnet18, 1 seed, small limits)
  acceptance.json     each step's exit status and seconds, the machine, the key figures
  acceptance.log      every step's output
Scratch files (the tfds copy, the workdir) go to --work. Exit status 1 if any step failed.

Options:
  --tiny            the same sequence with tiny sizes and the cnn, float32, on any machine (a
                    CPU takes a minute or two); no install unless --wheels is given
  --wheels DIR      the bundle folder (default: .whl in the repository)
  --data DIR        where cifar10-jpeg.tar.gz is (default: the bundle folder)
  --work DIR        scratch folder (default: a new one under \${TMPDIR:-/tmp})
  --python PY       the interpreter (default: python3)
  --skip-install    use the installed packages as they are
  --dry-run         print every command instead of running it (same as DRY_RUN=1)
  -h, --help        this text

With the device tool of this workplace: launch/make_gpu_bundle.sh here, then
  run(command="bash launch/gpu_acceptance.sh \$OUT", carry=[".whl"], timeout_s=600)
EOF
  printf '%s' "$text"
}

OUT=""
TINY=0
WHEELS=""
DATA=""
WORK=""
PY="python3"
INSTALL=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --tiny) TINY=1 ;;
    --skip-install) INSTALL=0 ;;
    --wheels|--data|--work|--python)
      [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
      case "$1" in
        --wheels) WHEELS="$2" ;; --data) DATA="$2" ;; --work) WORK="$2" ;; --python) PY="$2" ;;
      esac
      shift ;;
    -*) usage >&2; die "unknown argument '$1'" ;;
    *) [[ -z "$OUT" ]] || die "one OUTDIR only (got '$OUT' and '$1')"; OUT="$1" ;;
  esac
  shift
done
[[ -n "$OUT" ]] || { usage >&2; die "OUTDIR is missing"; }
if [[ -z "$WHEELS" ]]; then
  [[ "$TINY" == 1 ]] && INSTALL=0
  WHEELS="$REPO/.whl"
fi
DATA="${DATA:-$WHEELS}"
WORK="${WORK:-${TMPDIR:-/tmp}/fmcejax-acceptance.$$}"
SITE="$WORK/site"
LOG="$OUT/acceptance.log"

# Step caps (seconds) on a GPU, summing to under 9 minutes; none in tiny mode.
if [[ "$TINY" == 1 ]]; then
  BACKBONES=(cnn)
  CAP_INSTALL=0 CAP_IMPORTS=0 CAP_BENCH=0 CAP_BENCH_BIG=0 CAP_LOOP=0 CAP_TRAIN=0
  BENCH=(--image_shape "32,32,3" --batch_size 16 --dtype float32 --steps 2 --warmup 0 --rounds 1
         --torch none --pipeline_batches 2 --input_workers 0)
  LOOP=(--batch_sizes 16 --examples 128 --epochs 1 --rounds 1 --step_repeats 3
        --steps_per_dispatch "1,2"
        --required cnn --goal_backbone cnn --required_batch 16)
  TRAIN=(--config.backbone=cnn --config.dtype=float32 --config.input_on_device=on
         --config.batch_size=16 --config.eval_batch_size=32 --config.train_examples_limit=64
         --config.test_examples_limit=32 --config.epochs=1 --config.probe.epochs=3
         --config.num_phases=3 --config.probe.train_examples_limit=64
         --config.fmcs.subset_size=32 --config.fmce_net.epochs=1
         --config.fmce_net.batch_size=16)
else
  BACKBONES=(resnet18 resnet50)
  CAP_INSTALL=30 CAP_IMPORTS=30 CAP_BENCH=110 CAP_BENCH_BIG=160 CAP_LOOP=70 CAP_TRAIN=130
  BENCH=(--image_shape "32,32,3" --batch_size 512 --dtype bfloat16 --steps 30 --warmup 5
         --rounds 3 --torch both --pipeline_batches 100 --input_workers "0,8")
  LOOP=()
  TRAIN=(--config.epochs=2 --config.train_examples_limit=5120 --config.test_examples_limit=1000
         --config.probe.epochs=5 --config.probe.train_examples_limit=2560
         --config.fmcs.subset_size=512 --config.fmce_net.epochs=2)
fi

STEPS=()
# step NAME CAP COMMAND...: runs COMMAND (at most CAP seconds if CAP > 0), its output appended
# to the log, and records NAME:STATUS:SECONDS; a failed step does not stop the next ones.
step() {
  local name="$1" cap="$2" status=0 start=$SECONDS
  shift 2
  local cmd=("$@")
  [[ "$cap" -gt 0 ]] && cmd=(timeout -k 10 "$cap" "${cmd[@]}")
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${cmd[@]}"
    return 0
  fi
  printf '\n=== %s: %s\n' "$name" "$(quote "${cmd[@]}")" >>"$LOG"
  note "$name ..."
  "${cmd[@]}" >>"$LOG" 2>&1 || status=$?
  STEPS+=("$name:$status:$((SECONDS - start))")
  note "$name: exit status $status after $((SECONDS - start)) s"
  if [[ "$status" != 0 ]]; then
    tail -n 25 "$LOG" >&2
  fi
}

run mkdir -p "$OUT" "$WORK"
[[ "$DRY_RUN" == 1 ]] || : >"$LOG"
run cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [[ "$INSTALL" == 1 ]]; then
  [[ "$DRY_RUN" == 1 ]] || compgen -G "$WHEELS/*.whl" >/dev/null \
    || die "no wheels in $WHEELS: run launch/make_gpu_bundle.sh first, or pass --skip-install"
  step install "$CAP_INSTALL" "$PY" -m pip install --quiet --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$REPO:$SITE"  # the checkout first: its code, the bundle's dependencies
fi
step imports "$CAP_IMPORTS" "$PY" -c \
  "import fmcejax.train, fmcejax.bench, fmcejax.bench_loop, jax; print(jax.devices())"
for backbone in "${BACKBONES[@]}"; do
  cap="$CAP_BENCH"
  [[ "$backbone" == resnet50 ]] && cap="$CAP_BENCH_BIG"
  step "bench_$backbone" "$cap" "$PY" -m fmcejax.bench --backbone "$backbone" "${BENCH[@]}" \
    --json "$OUT/bench_$backbone.json"
done
step loop "$CAP_LOOP" "$PY" -m fmcejax.bench_loop ${LOOP[@]+"${LOOP[@]}"} --json "$OUT/loop.json"
step train "$CAP_TRAIN" "$PY" -m fmcejax.train --config configs/cifar10_resnet18.py \
  --workdir "$WORK/train" --config.dataset=cifar10_jpeg --config.data_dir="$DATA" \
  --config.tfds_data_dir="$WORK/tfds" --config.seeds=1 --config.progress_bar=False "${TRAIN[@]}"
[[ "$DRY_RUN" == 1 ]] && exit 0

"$PY" "$HERE/acceptance_summary.py" --out "$OUT" --workdir "$WORK/train" --tiny "$TINY" \
  "${STEPS[@]}"
