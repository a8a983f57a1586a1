"""`python -m fmcejax.bench_loop`: the command of `fmcejax.tools.bench_loop`."""

import sys

from fmcejax.tools.bench_loop import main

if __name__ == "__main__":
  main(sys.argv[1:])
