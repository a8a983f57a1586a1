#!/usr/bin/env bash
# The studies of runs trained longer (README, "Trained longer"), one after the other:
# Fashion-MNIST at 30 epochs (5 seeds), then CIFAR-10 JPEG with crop + flip at 30 epochs (3 seeds);
# each with alpha 0.03 and 0.1 at conv3, one baseline seed at twice the length (the doubling
# rule), then the `random` control at the better alpha. About 4.7 h alone on a 2-core CPU; every
# command resumes where it stopped.
#   bash docs/studies/converged.sh [ROOT]    (ROOT defaults to ./studies)
set -euo pipefail
root=${1:-studies}

best_alpha() {  # the alpha of the study's arm with the larger mean gain
  python - "$1/study.json" <<'PY'
import json, sys
arms = [a for a in json.load(open(sys.argv[1]))["arms"] if a["head"] == "trained"]
print(max(arms, key=lambda a: a["gain_pp_mean"])["alpha"])
PY
}

study() {  # NAME CONFIG SEEDS CONTROLS [FIELD=VALUE ...]: the baseline and both alphas; with
  # CONTROLS=random also the control at the better alpha (the second run reuses the first's)
  local name=$1 config=$2 seeds=$3 controls=$4
  shift 4
  local args=(--config="$config" --workdir="$root/$name" --config.seeds="$seeds"
    --study.alphas=0.03,0.1 --study.modules=conv3 "$@" --study.controls="$controls")
  if [[ -n $controls ]]; then
    args+=(--study.control_alpha="$(best_alpha "$root/$name")" --study.control_module=conv3)
  fi
  python -m fmcejax.study "${args[@]}"
}

doubled() {  # NAME CONFIG EPOCHS [FIELD=VALUE ...]: baseline seed 0 at twice the length
  local name=$1 config=$2 epochs=$3
  shift 3
  python -m fmcejax.train --config="$config" --workdir="$root/$name" --config.seeds=1 \
    --config.epochs="$epochs" --config.stages=baseline "$@"
}

# Whether the runs converged (the doubled baseline) is read before the control.
study fashion_mnist_30ep fashion_mnist_cnn 5 "" --config.epochs=30
doubled fashion_mnist_60ep_baseline fashion_mnist_cnn 60
study fashion_mnist_30ep fashion_mnist_cnn 5 random --config.epochs=30
study cifar10_jpeg_30ep cifar10_jpeg_cpu_long 3 ""
doubled cifar10_jpeg_60ep_baseline cifar10_jpeg_cpu_long 60
study cifar10_jpeg_30ep cifar10_jpeg_cpu_long 3 random
