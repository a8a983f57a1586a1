r"""Will this config run on that hardware, and how long will it take? Compiled, not run.

    python -m fmcejax.preflight --target TARGET [--config NAME_OR_FILE] [--out DIR]
                                [--config.FIELD=VALUE ...]

For a TPU topology (`v5e:2x2`, `v5e:16x16`, `v4:2x2x2`, ...) or an NVIDIA box (`h100:8`,
`h200:2x8`) without that hardware, every program of the config's stages is compiled with the
target's own compiler (libtpu, the CUDA plugin: `pip install 'fmcejax[aot]'`) in a child process
(`fmcejax.tools.preflight_compile`), through the code `train` runs. Writes `DIR/preflight.json` and a table:
memory against the chip's HBM, FLOPs, HBM bytes, collectives, roofline step time and images/s
per chip, and the whole pipeline's time at those rates. Every time is a compiler estimate, not a
measurement. Exit 2 on bad input (before compiling), 1 when a program does not compile or fit.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import resource
import subprocess
import sys
import tempfile
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from fmcejax import cli, config_lib
from fmcejax.tools import preflight_targets

INSTALL = "pip install 'fmcejax[aot]'"
_COMPILER = {"tpu": "libtpu", "cuda": "jax-cuda12-plugin"}  # distributions
NOTE = (
  "Compiler estimates, not measurements: roofline = the larger of FLOPs / peak and HBM bytes "
  "(summed over the compiled kernels) / bandwidth."
)


def compile_in_child(
  target: preflight_targets.Target,
  config: ml_collections.ConfigDict,
  heaviest: int = 10,
  module: str = "fmcejax.tools.preflight_compile",
) -> dict:
  """`preflight_compile.run` in a child process with the compilers' own environment, its output
  (the compilers' start-up noise) shown only when it fails. A compiler that kills the child (a
  crash, not an error it reports) fails only the program it was compiling: that program's row
  says so and a new child compiles the rest."""
  env = dict(os.environ, FMCEJAX_COMPILERS="1")
  if target.kind != "local":
    # No TPU to claim: several compiling processes (tests, other users) may load libtpu at once.
    env |= {"JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  header: dict[str, Any] = {}
  rows: list[dict[str, Any]] = []
  with tempfile.TemporaryDirectory() as tmp:
    request, records = os.path.join(tmp, "request.json"), os.path.join(tmp, "records.jsonl")
    while True:
      with open(request, "w") as f:
        skip = [r["name"] for r in rows]
        request_body = {"target": target.spec, "config": config.to_dict(), "skip": skip}
        json.dump(request_body | {"heaviest": heaviest}, f)
      open(records, "w").close()
      proc = subprocess.run(
        [sys.executable, "-m", module, request, records],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_unlimited_stack,
      )
      compiling = None
      with open(records) as f:
        for record in map(json.loads, f):
          if "program" in record:
            rows.append(record["program"])
            compiling = None
          elif "compiling" in record:
            compiling = record["compiling"]
          else:
            header = record
      if not proc.returncode:
        return header | {"programs": rows}
      if compiling is None:  # died outside any compile: nothing to attribute it to
        raise RuntimeError(f"the compiling process failed:\n{proc.stdout[-4000:]}")
      rows.append({"name": compiling, "compiled": _crash(proc.returncode, proc.stdout)})


def _unlimited_stack() -> None:
  """The compiling child's stack limit raised to the hard limit: libtpu 0.0.42.1 recurses past
  the usual 8 MiB compiling the ResNet steps for v6e (SIGSEGV in MigrateInstructionUsers)."""
  _, hard = resource.getrlimit(resource.RLIMIT_STACK)
  resource.setrlimit(resource.RLIMIT_STACK, (hard, hard))


def _crash(returncode: int, output: str) -> str:
  """What a compiler that killed its process leaves to say: the signal and the last lines that
  are not a stack frame."""
  how = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
  lines = [
    line for line in output.splitlines() if line.strip() and not line.lstrip().startswith("@")
  ]
  return f"the compiler crashed ({how}): " + " | ".join(lines[-6:])[-1500:]


def chip_of(target: preflight_targets.Target, device_kind: str) -> preflight_targets.Chip | None:
  if target.chip:
    return preflight_targets.CHIPS[target.chip]
  kind = device_kind.lower().replace(" lite", "e")
  return next((c for k, c in preflight_targets.CHIPS.items() if k in kind.replace(" ", "")), None)


def rates(row: dict[str, Any], chip: preflight_targets.Chip | None, devices: int) -> None:
  """Adds the fit verdict and the roofline step time and images/s per chip to a program's row."""
  row["hbm_bytes"] = chip.hbm_bytes if chip else None
  if row["compiled"] is not True:
    row |= {"fits": False, "roofline_seconds_per_step": None, "roofline_images_per_second": None}
    return
  row["fits"] = chip is None or row["memory_bytes"]["total"] <= chip.hbm_bytes
  times = []
  if chip and row["flops_per_step"]:
    times.append(row["flops_per_step"] / chip.peak_flops)
  if chip and row["bytes_per_step"]:
    times.append(row["bytes_per_step"] / chip.hbm_bandwidth)
  seconds = max(times) if times else None
  row["roofline_seconds_per_step"] = seconds
  row["roofline_images_per_second"] = (
    row["images_per_step"] / devices / seconds if seconds else None
  )


def pipeline_seconds(config: ml_collections.ConfigDict, programs: dict[str, dict]) -> float | None:
  """The config's every stage and seed at the roofline rates (the probe at all its epochs)."""
  from fmcejax import input_pipeline

  info = config_lib.dataset_info(config)
  stages, seeds = config_lib.parse_stages(config.stages), len(config_lib.parse_seeds(config.seeds))
  t = {name: row.get("roofline_seconds_per_step") for name, row in programs.items()}
  evals = -(
    -min(config.test_examples_limit or info.num_test, info.num_test) // config.eval_batch_size
  )
  total, parts = 0.0, []
  if "probe" in stages:
    spe = input_pipeline.steps_per_epoch(info, config.batch_size, config.probe.train_examples_limit)
    parts.append((t.get("train_step"), config.probe.epochs * spe))
    parts.append((t.get("eval_step"), evals))
  spe = input_pipeline.steps_per_epoch(info, config.batch_size, config.train_examples_limit)
  for stage, name in (("baseline", "train_step"), ("fmcenetpp", "train_step_ral")):
    if stage in stages:
      parts.append((t.get(name), seeds * config.epochs * spe))
      parts.append((t.get("eval_step"), seeds * config.epochs * evals))
  if "fmcs_data" in stages:
    parts.append(
      (
        t.get("fmcs_extraction"),
        config.num_phases * -(-config.fmcs.subset_size // config.eval_batch_size),
      )
    )
  if "fmce_net" in stages:
    rows = config.num_phases * (
      config.fmcs.subset_size - round(config.fmcs.subset_size * config.fmcs.holdout_fraction)
    )
    parts.append(
      (t.get("fmce_net_train_step"), config.fmce_net.epochs * (rows // config.fmce_net.batch_size))
    )
  for seconds, count in parts:
    if seconds is None:
      return None
    total += seconds * count
  return total


def table(report: dict[str, Any], kernels: int = 0) -> str:
  """The report as text; with `kernels`, each program's heaviest kernels under its line."""
  lines = [
    f"preflight {report['target']}: {report['devices']} devices, {report['processes']} processes, "
    f"{report['chip']['name'] if report['chip'] else 'unknown chip'}. {NOTE}",
    f"{'program':<22}{'memory GB':>10}{'HBM GB':>8}{'fits':>6}{'GFLOP':>10}{'GB moved':>10}"
    f"{'collectives':>12}{'ms/step':>9}{'img/s/chip':>12}",
  ]
  for p in report["programs"]:
    if p["compiled"] is not True:
      lines.append(f"{p['name']:<22}does not compile: {p['compiled'][:300]}")
      continue
    gb = lambda x: f"{x / 1e9:.2f}" if x is not None else "-"  # noqa: E731
    fmt = lambda x, f: f.format(x) if x is not None else "-"  # noqa: E731
    lines.append(
      f"{p['name']:<22}{gb(p['memory_bytes']['total']):>10}{gb(p['hbm_bytes']):>8}"
      f"{str(p['fits']):>6}{fmt(p['flops_per_step'] and p['flops_per_step'] / 1e9, '{:.1f}'):>10}"
      f"{gb(p['bytes_per_step']):>10}{p['collectives']['count']:>12}"
      f"{fmt(p['roofline_seconds_per_step'] and p['roofline_seconds_per_step'] * 1e3, '{:.2f}'):>9}"
      f"{fmt(p['roofline_images_per_second'], '{:.0f}'):>12}"
    )
    for k in p["heaviest_kernels"][:kernels]:
      once = " per call" if p["steps_per_call"] > 1 and not k["in_loop"] else ""
      lines.append(
        f"    {k['bytes'] / 1e6:10.1f} MB{once:<9} {k['opcode']:<24} {k['op_name'][-90:]}"
      )
  s = report["pipeline_seconds_roofline"]
  lines.append(
    f"whole pipeline at these rates: {s / 3600:.2f} h" if s else "whole pipeline: unknown"
  )
  return "\n".join(lines)


def verdict(report: dict[str, Any], config: ml_collections.ConfigDict) -> list[str]:
  """One line per program that does not compile or fit (exit 1 when any)."""
  from fmcejax.tools.preflight_compile import fitting_batch

  out = []
  for p in report["programs"]:
    if p["compiled"] is not True and "memory_bytes" not in p:
      out.append(
        f"program {p['name']} does not compile for {report['target']}: {p['compiled'][:500]}"
      )
    elif not p["fits"]:  # compiled, or refused by the compiler for its size
      per_chip = p["images_per_step"] // report["devices"]
      out.append(
        f"program {p['name']} needs {p['memory_bytes']['total'] / 2**30:.2f} GiB per chip, the "
        f"{report['chip']['name']} has {p['hbm_bytes'] / 2**30:.2f} GiB: a per-chip batch of "
        f"about {fitting_batch(p['memory_bytes'], p['hbm_bytes'], per_chip)} (not {per_chip}) would fit."
      )
  return out


def run(
  target: preflight_targets.Target,
  config: ml_collections.ConfigDict,
  out: str,
  kernels: int = 0,
  name: str = "",
) -> int:
  from fmcejax import workdir

  child = compile_in_child(target, config, max(10, kernels))
  if "config_error" in child:
    return cli.fail(
      f"{child['config_error']} (target {target.spec}: {child['devices']} devices, {child['processes']} processes)"
    )
  chip = chip_of(target, child["device_kind"])
  for row in child["programs"]:
    rates(row, chip, child["devices"])
  report = {
    "config": name,
    "target": target.spec,
    "chip": dataclasses.asdict(chip) if chip else None,
    "devices": child["devices"],
    "processes": child["processes"],
    "device_kind": child["device_kind"],
    "note": NOTE,
    "programs": child["programs"],
    "pipeline_seconds_roofline": pipeline_seconds(
      config, {p["name"]: p for p in child["programs"]}
    ),
  }
  workdir.write_json(workdir.path(out) / "preflight.json", report)
  print(table(report, kernels))
  problems = verdict(report, config)
  for line in problems:
    print(f"fmcejax: preflight: {line}", file=sys.stderr)
  return 1 if problems else 0


def installed(distribution: str) -> bool:
  """Whether a distribution (a compiler of the `aot` extra) is installed."""
  try:
    importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


def define_flags() -> None:
  flags.DEFINE_string("target", None, preflight_targets.ACCEPTED)
  flags.DEFINE_string("out", "./preflight", "where preflight.json goes")
  flags.DEFINE_integer(
    "kernels", 0, "also print each program's N kernels that move the most bytes", lower_bound=0
  )


PREFLIGHT = cli.Command(
  module="fmcejax.preflight",
  summary=__doc__.splitlines()[0],
  usage="--target TARGET [--config NAME_OR_FILE] [--out DIR] [--config.FIELD=VALUE ...]",
  examples=(
    "python -m fmcejax.preflight --target=v5e:2x2  # the default job's programs on a TPU v5e slice",
    "python -m fmcejax.preflight --target=h100:8 --config=cifar10_resnet50 --out=preflight/h100",
    "python -m fmcejax.preflight --target=v5e:16x16 --config=cifar10_resnet18 "
    "--config.batch_size=1024 --config.eval_batch_size=1024",
  ),
  define=define_flags,
)


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  try:
    config = cli.parse(PREFLIGHT, argv)
    config_lib.parse_stages(config.stages)
  except (cli.CommandLineError, config_lib.ConfigError) as e:
    return cli.fail(str(e))
  target = preflight_targets.parse(flags.FLAGS.target or "")
  if target is None:
    return cli.fail(
      str(
        config_lib.ConfigError("--target", flags.FLAGS.target, preflight_targets.ACCEPTED)
      ).replace("config field ", "flag ")
    )
  compiler = _COMPILER.get(target.kind)
  if compiler and not installed(compiler):
    return cli.fail(
      f"--target={target.spec} needs the {compiler} compiler, not installed here: {INSTALL}"
    )
  name = os.path.splitext(os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"])))
  return run(target, config, flags.FLAGS.out, flags.FLAGS.kernels, name[0])


if __name__ == "__main__":
  sys.exit(main())
