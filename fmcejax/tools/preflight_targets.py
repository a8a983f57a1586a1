"""What preflight compiles for: the chips' public figures and the NVIDIA boxes' target configs.

A target is a Cloud TPU topology as libtpu names it (`v5e:2x2`, `v4:2x2x2`, `v5p:2x2x1`), an
NVIDIA box `h100:8` / `h200:2x8` (hosts x GPUs), or `local` (this machine's devices). Figures are
the vendors' published peak dense bfloat16 FLOP/s, HBM capacity and bandwidth per chip.
"""

from __future__ import annotations

import dataclasses
import re


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # dense bfloat16, per chip
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  source: str


CHIPS = {
  "v4": Chip("TPU v4", 275e12, 32 * 2**30, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
  "v5e": Chip("TPU v5e", 197e12, 16 * 2**30, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
  "v5p": Chip("TPU v5p", 459e12, 95 * 2**30, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
  "v6e": Chip("TPU v6e", 918e12, 32 * 2**30, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
  "h100": Chip(
    "NVIDIA H100 SXM 80GB",
    989e12,
    80 * 10**9,
    3.35e12,
    "https://www.nvidia.com/en-us/data-center/h100/",
  ),
  "h200": Chip(
    "NVIDIA H200 SXM 141GB",
    989e12,
    141 * 10**9,
    4.8e12,
    "https://www.nvidia.com/en-us/data-center/h200/",
  ),
}
TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
GPU_CHIPS = ("h100", "h200")

# XLA's GpuTargetConfig (text proto) of each GPU: what the CUDA compiler needs to compile without
# the GPU. SM count, memory and bandwidth are NVIDIA's public figures (`CHIPS`' sources); the
# layout follows XLA's own xla/backends/gpu/target_config/specs/h100_sxm.txtpb.
_GPU_TARGET = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{
    major: 9
  }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 1
}}
runtime_version {{
  major: 12
  minor: 4
}}
device_description_str: "{name}"
"""


def gpu_target_config(chip: str) -> str:
  """The GpuTargetConfig text proto of an `h100` or `h200` (132 SMs each)."""
  c = CHIPS[chip]
  return _GPU_TARGET.format(
    sms=132, bandwidth=int(c.hbm_bandwidth), memory=c.hbm_bytes, name=c.name
  )


@dataclasses.dataclass(frozen=True)
class Target:
  spec: str
  kind: str  # tpu | cuda | local
  chip: str  # a key of CHIPS ("" for local)
  hosts: int = 1  # GPU boxes only; TPU topologies know their own hosts
  per_host: int = 0


_TPU = re.compile(r"^(v4|v5e|v5p|v6e):\d+(x\d+){1,2}$")
_GPU = re.compile(r"^(h100|h200):(?:(\d+)x)?(\d+)$")
ACCEPTED = (
  "a TPU topology (v4:2x2x2, v5e:2x2, v5e:16x16, v5p:2x2x1, v6e:2x4, ...), an NVIDIA box "
  "(h100:8, h200:8, h100:2x8 = hosts x GPUs) or local"
)


def parse(spec: str) -> Target | None:
  """The target `spec` names, or None when it names none."""
  if spec == "local":
    return Target(spec, "local", "")
  if _TPU.match(spec):
    return Target(spec, "tpu", spec.split(":")[0])
  m = _GPU.match(spec)
  if m and int(m.group(3)) >= 1 and int(m.group(2) or 1) >= 1:
    return Target(spec, "cuda", m.group(1), int(m.group(2) or 1), int(m.group(3)))
  return None
