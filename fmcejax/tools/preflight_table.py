"""docs/BENCHMARKS.md's table of compiled settings, from preflight reports.

    python -m fmcejax.tools.preflight_table docs/bench/preflight/*/preflight.json

One row per report: its train steps (baseline / RAL) per chip and the whole pipeline's time. The
kernel count is there because the roofline ignores each kernel's fixed cost: a step of many small
kernels can be far slower than its FLOPs and bytes say.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

HEADER = (
  "| config | target | batch / chip | memory / chip (largest program) | GFLOP / image | "
  "MB / image (HBM) | kernels | roofline img/s / chip | MFU bound | "
  "pipeline (all stages, its seeds) |\n"
  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _pair(rows: list[dict], key, fmt: str) -> str:
  values = [key(r) for r in rows]
  return " / ".join(fmt.format(v) if v is not None else "-" for v in values)


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return "unknown"
  if seconds < 60:
    return f"{seconds:.0f} s"
  if seconds < 3600:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def row(config: str, report: dict[str, Any]) -> str:
  """A table row: train step / RAL step figures, per chip and per image."""
  programs = {p["name"]: p for p in report["programs"]}
  train = [programs[n] for n in ("train_step", "train_step_ral") if n in programs]
  devices = report["devices"]
  failed = [p["name"] for p in report["programs"] if p["compiled"] is not True or not p["fits"]]
  per_chip = next((p["images_per_step"] // devices for p in train if "images_per_step" in p), None)
  memory = max(
    (p["memory_bytes"]["total"] for p in report["programs"] if p.get("memory_bytes")), default=0
  )
  hbm = report["chip"]["hbm_bytes"] if report["chip"] else None

  def per_image(key: str, scale: float):
    return lambda p: p[key] / (p["images_per_step"] / devices) / scale if p.get(key) else None

  def mfu(p):
    if not p.get("roofline_seconds_per_step") or not report["chip"]:
      return None
    return 100 * p["flops_per_step"] / report["chip"]["peak_flops"] / p["roofline_seconds_per_step"]

  status = f"{memory / 2**30:.2f} GiB of {hbm / 2**30:.0f}" if hbm else f"{memory / 2**30:.2f} GiB"
  if failed:
    status += f" (does not compile or fit: {', '.join(failed)})"
  return (
    f"| {config} | {report['target']} | {per_chip} | {status} | "
    f"{_pair(train, per_image('flops_per_step', 1e9), '{:.2f}')} | "
    f"{_pair(train, per_image('bytes_per_step', 1e6), '{:.1f}')} | "
    f"{_pair(train, lambda p: p.get('kernels'), '{:,}')} | "
    f"{_pair(train, lambda p: p['roofline_images_per_second'], '{:,.0f}')} | "
    f"{_pair(train, mfu, '{:.0f}%')} | {_duration(report['pipeline_seconds_roofline'])} |"
  )


def main(argv: list[str]) -> int:
  print(HEADER)
  for path in argv[1:]:
    with open(path) as f:
      report = json.load(f)
    directory = path.split("/")[-2]  # reports without a name: <config>_<target> folders
    suffix = "_" + re.sub("[:x]", "_", report["target"])
    print(row(report.get("config") or directory.removesuffix(suffix), report))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
