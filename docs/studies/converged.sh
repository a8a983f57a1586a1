#!/usr/bin/env bash
# The studies of runs trained longer (README, "Trained longer"), one after the other:
# Fashion-MNIST at 30 epochs (5 seeds), then CIFAR-10 JPEG with crop + flip at 30 epochs (3 seeds);
# each with alpha 0.03 and 0.1 at conv3, the `random` control at the better alpha, and one
# baseline seed at twice the length (the doubling rule). Every command resumes where it stopped.
#   bash docs/studies/converged.sh [ROOT]    (ROOT defaults to ./studies)
# A session that ends before the studies do packs what they finished (each run's metrics and the
# trained heads) into docs/studies/converged_resume.tar.gz (`cd ROOT` from the checkout, then):
#   find . \( -path './*/baseline/metrics.json' -o -path './*/baseline/*/metrics.json' \
#     -o -path './*/arms/*/metrics.json' -o -path './*/modules/*/fmce_net/metrics.json' \
#     -o -path './*/modules/*/fmce_net/head/*' \) -type f | sort \
#     | tar -czf "$OLDPWD/docs/studies/converged_resume.tar.gz" -T -
# and the next one continues with
#   mkdir -p studies && tar -xzf docs/studies/converged_resume.tar.gz -C studies
# before this script, which then rebuilds the probe, CQI and FMCS-Dataset and runs what is left.
set -euo pipefail
root=${1:-studies}

best_alpha() {  # the alpha of the study's arm with the larger mean gain
  python - "$1/study.json" <<'PY'
import json, sys
arms = [a for a in json.load(open(sys.argv[1]))["arms"] if a["head"] == "trained"]
print(max(arms, key=lambda a: a["gain_pp_mean"])["alpha"])
PY
}

grid() {  # NAME CONFIG SEEDS [FIELD=VALUE ...]: the baseline and both alphas
  local name=$1 config=$2 seeds=$3
  shift 3
  python -m fmcejax.study --config="$config" --workdir="$root/$name" --config.seeds="$seeds" \
    --study.alphas=0.03,0.1 --study.modules=conv3 "$@" --study.controls=
}

control() {  # NAME CONFIG SEEDS [FIELD=VALUE ...]: the grid plus the random control
  local name=$1 config=$2 seeds=$3
  shift 3
  python -m fmcejax.study --config="$config" --workdir="$root/$name" --config.seeds="$seeds" \
    --study.alphas=0.03,0.1 --study.modules=conv3 "$@" --study.controls=random \
    --study.control_alpha="$(best_alpha "$root/$name")" --study.control_module=conv3
}

doubled() {  # NAME CONFIG EPOCHS [FIELD=VALUE ...]: baseline seed 0 at twice the length
  local name=$1 config=$2 epochs=$3
  shift 3
  python -m fmcejax.train --config="$config" --workdir="$root/$name" --config.seeds=1 \
    --config.epochs="$epochs" --config.stages=baseline "$@"
}

# The doubling run comes before the control: whether the runs converged is read first.
grid fashion_mnist_30ep fashion_mnist_cnn 5 --config.epochs=30
control fashion_mnist_30ep fashion_mnist_cnn 5 --config.epochs=30
doubled fashion_mnist_60ep_baseline fashion_mnist_cnn 60
grid cifar10_jpeg_30ep cifar10_jpeg_cpu_long 3
doubled cifar10_jpeg_60ep_baseline cifar10_jpeg_cpu_long 60
control cifar10_jpeg_30ep cifar10_jpeg_cpu_long 3
