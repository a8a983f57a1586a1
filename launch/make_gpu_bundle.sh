#!/usr/bin/env bash
# Builds the offline bundle of launch/gpu_acceptance.sh: wheels + the CIFAR-10 JPEG archive.
set -euo pipefail

HERE="$(cd "${BASH_SOURCE[0]%/*}" && pwd)"
REPO="${HERE%/*}"
# shellcheck source=launch/lib.sh
source "$HERE/lib.sh"

# What `pip install fmcejax` needs that the GPU machine's image lacks (its package list:
# .library/device/KINDS.md; it has jax[cuda], flax, optax, orbax, chex, torch, etils, pyarrow,
# protobuf, ...), at the versions the tests pass with. promise has no wheel: built here.
WHEELS=(array-record==0.8.6 dm-tree==0.1.10 docstring-parser==0.18.0
        googleapis-common-protos==1.76.0 grain==0.2.18 immutabledict==4.3.1
        importlib-resources==7.1.0 ml-collections==1.1.0 portpicker==1.6.0
        simple-parsing==0.1.9 tensorboardx==2.6.5 tensorflow-datasets==4.9.10
        tensorflow-metadata==1.21.0 termcolor==3.3.0 toml==0.10.2 tzdata==2026.6)
SOURCE_ONLY=(promise==2.3)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)
LIMIT_MB=60

usage() {
  local text
  IFS= read -r -d '' text <<EOF || true
Usage: launch/make_gpu_bundle.sh [options]

Run here, with network: downloads the wheels launch/gpu_acceptance.sh installs offline on the
GPU machine (CPython 3.12, manylinux x86_64), builds the fmcejax wheel, copies the CIFAR-10
JPEG archive beside them, and checks that all of it stays under $LIMIT_MB MB. Old wheels in the
folder are removed first (pip --no-index refuses two versions of one package).

Options:
  --dest DIR        the bundle folder (default: .whl in the repository, git-ignored)
  --archive FILE    cifar10-jpeg.tar.gz (default: ../shared/data/ beside the repository)
  --python PY       the Python whose pip downloads and builds (default: python3)
  --dry-run         print every command instead of running it (same as DRY_RUN=1)
  -h, --help        this text

Then, with the device tool: carry .whl and run 'bash launch/gpu_acceptance.sh \$OUT'.
EOF
  printf '%s' "$text"
}

DEST="$REPO/.whl"
ARCHIVE="$REPO/../shared/data/cifar10-jpeg.tar.gz"
PYTHON="python3"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1 ;;
    --dest|--archive|--python)
      [[ $# -ge 2 ]] || die "$1 needs a value (see --help)"
      case "$1" in
        --dest) DEST="$2" ;; --archive) ARCHIVE="$2" ;; --python) PYTHON="$2" ;;
      esac
      shift ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
  shift
done

[[ "$DRY_RUN" == 1 || -f "$ARCHIVE" ]] || die "no CIFAR-10 JPEG archive at $ARCHIVE (see --archive)"
platform_flags=()
for p in "${PLATFORMS[@]}"; do
  platform_flags+=(--platform "$p")
done
run mkdir -p "$DEST"
run find "$DEST" -maxdepth 1 -name '*.whl' -delete
run "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${platform_flags[@]}" -d "$DEST" "${WHEELS[@]}"
run "$PYTHON" -m pip wheel --quiet --no-deps -w "$DEST" "${SOURCE_ONLY[@]}" "$REPO"
run cp -f "$ARCHIVE" "$DEST/"
if [[ "$DRY_RUN" != 1 ]]; then
  for wheel in "$DEST"/*.whl; do  # pure-Python builds only: nothing compiled for this host
    [[ "$wheel" != *-none-any.whl && "$wheel" != *manylinux* ]] && die "$wheel is not portable"
  done
  bytes="$(du -cb "$DEST"/*.whl "$DEST/${ARCHIVE##*/}" | tail -n 1 | cut -f 1)"
  mb=$((bytes / 1000000))
  printf '%s: %s wheels + %s = %d MB (limit %d MB)\n' "$DEST" \
    "$(find "$DEST" -maxdepth 1 -name '*.whl' | wc -l)" "${ARCHIVE##*/}" "$mb" "$LIMIT_MB"
  [[ "$bytes" -lt $((LIMIT_MB * 1000000)) ]] || die "the bundle is $mb MB, over $LIMIT_MB MB"
fi
