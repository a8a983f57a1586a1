"""A stand-in for `fmcejax.tools.preflight_compile` whose compiler kills its process (SIGSEGV)
on the program named by $CRASH_ON, as libtpu's did for a v6e program (tests/test_preflight.py)."""

import json
import os
import signal
import sys

PROGRAMS = ("train_step", "train_step_ral", "eval_step")

with open(sys.argv[1]) as f:
  request = json.load(f)
with open(sys.argv[2], "a") as out:
  out.write(json.dumps({"devices": 8, "processes": 1, "device_kind": "TPU v6 lite"}) + "\n")
  for name in PROGRAMS:
    if name in request["skip"]:
      continue
    out.write(json.dumps({"compiling": name}) + "\n")
    out.flush()
    if name == os.environ["CRASH_ON"]:
      print("    @ 0x7f  MigrateInstructionUsers()\nstack overflow", flush=True)
      os.kill(os.getpid(), signal.SIGSEGV)
    out.write(json.dumps({"program": {"name": name, "compiled": True}}) + "\n")
