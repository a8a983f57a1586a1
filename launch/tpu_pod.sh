#!/usr/bin/env bash
# A Cloud TPU pod slice (several hosts, e.g. v5litepod-16 or v4-32): the same steps as tpu_vm.sh
# on every worker at once, with the workdir on a gcsfuse-mounted bucket that every host shares.
# JAX finds the other hosts itself on Cloud TPU (no coordinator flags). See launch/README.md.
set -euo pipefail
MODE=pod
# shellcheck source=launch/tpu_common.sh
source "$(cd "${BASH_SOURCE[0]%/*}" && pwd)/tpu_common.sh"
