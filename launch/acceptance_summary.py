"""The last step of launch/gpu_acceptance.sh: acceptance.json and train.json from what ran.

    python launch/acceptance_summary.py --out OUTDIR --workdir WORKDIR --tiny 0|1 NAME:STATUS:S ...

Collects each step's exit status and seconds, the machine, the key figures of the bench and
loop JSON files, and every stage's metrics of the short pipeline; prints the figures and exits
1 if a step failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

HEADLINE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_resnet50.py"
STAGES = ("probe", "cqi", "fmcs_data", "fmce_net", "baseline", "fmcenetpp", "report")


def _read(path: Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def _gpu() -> str | None:
  if shutil.which("nvidia-smi") is None:
    return None
  query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
  result = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
  return result.stdout.strip() or result.stderr.strip()


def bench_figures(bench: dict[str, Any]) -> dict[str, Any]:
  """Per variant: JAX img/s and MFU, JAX over torch eager and torch.compile; RAL overhead."""
  out: dict[str, Any] = {"ral_over_baseline": bench["ratios"]["ral_over_baseline_step_time"]}
  for variant, figures in bench["results"]["jax"].items():
    out[variant] = {
      "images_per_second": figures.get("images_per_second"),
      "mfu": figures.get("mfu"),
      **{
        f"jax_over_{fw}": bench["ratios"]
        .get(f"jax_over_{fw}_{variant}", {})
        .get("images_per_second")
        for fw in ("torch_eager", "torch_compile")
      },
    }
  return out


def headline_minutes(bench: dict[str, Any] | None) -> float | None:
  """configs/cifar10_resnet50.py, every stage and seed, at the measured ResNet-50 rates: the
  probe's images at the baseline rate, the paired runs' at the baseline and RAL rates. The
  rates are the bench's at batch 512 (the config trains at 128); evaluation, the FMCS-Dataset
  and the FMCE-Net (under 10% of the work) are left out."""
  if not bench:
    return None
  from fmcejax import config_lib, datasets, input_pipeline

  spec = importlib.util.spec_from_file_location("headline", HEADLINE_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  rate = {v: bench["results"]["jax"][v].get("images_per_second") for v in ("baseline", "ral")}
  if not all(rate.values()):
    return None
  runs = (
    len(config_lib.parse_seeds(c.seeds))
    * c.epochs
    * input_pipeline.num_examples(datasets.DATASET_INFO[c.dataset], "train", c.train_examples_limit)
  )
  probe = c.probe.epochs * input_pipeline.num_examples(
    datasets.DATASET_INFO[c.dataset], "train", c.probe.train_examples_limit
  )
  return ((probe + runs) / rate["baseline"] + runs / rate["ral"]) / 60


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--workdir", type=Path, required=True)
  parser.add_argument("--tiny", type=int, default=0)
  parser.add_argument("steps", nargs="*")
  args = parser.parse_args(argv)
  steps = {}
  for entry in args.steps:
    name, status, seconds = entry.rsplit(":", 2)
    steps[name] = {"status": int(status), "seconds": int(seconds)}
  benches = {p.stem.removeprefix("bench_"): _read(p) for p in sorted(args.out.glob("bench_*.json"))}
  loop = _read(args.out / "loop.json")
  train = {stage: _read(args.workdir / stage / "metrics.json") for stage in STAGES}
  train["report"] = _read(args.workdir / "report.json")
  (args.out / "train.json").write_text(json.dumps(train, indent=2))
  figures: dict[str, Any] = {name: bench_figures(b) for name, b in benches.items() if b}
  if loop:
    figures["loop"] = {
      "ceiling": {b: e["ceiling"] for b, e in loop["loop"].items()},
      "goal": loop["goal"],
    }
  figures["headline_pipeline_minutes"] = headline_minutes(benches.get("resnet50"))
  if train["report"]:
    figures["train"] = {k: train["report"].get(k) for k in ("gain_pp_mean",)}
    figures["train"]["baseline_test_accuracy"] = (train["baseline"] or {}).get("test_accuracy")
  environment = (next(iter(benches.values()), None) or loop or {}).get("environment")
  result = {
    "mode": "tiny" if args.tiny else "gpu",
    "gpu": _gpu(),
    "environment": environment,
    "steps": steps,
    "seconds": sum(s["seconds"] for s in steps.values()),
    "figures": figures,
    "ok": all(s["status"] == 0 for s in steps.values()),
  }
  (args.out / "acceptance.json").write_text(json.dumps(result, indent=2))
  print(json.dumps({k: result[k] for k in ("mode", "gpu", "steps", "seconds", "ok")}, indent=2))
  print(json.dumps(figures, indent=2))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
