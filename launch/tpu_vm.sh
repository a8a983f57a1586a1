#!/usr/bin/env bash
# One Cloud TPU VM (a single-host slice such as v5litepod-8): create, set up, run, fetch, delete.
# See launch/README.md and 'launch/tpu_vm.sh --help'.
set -euo pipefail
MODE=vm
# shellcheck source=launch/tpu_common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/tpu_common.sh"
