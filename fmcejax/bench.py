"""`python -m fmcejax.bench`: the command of `fmcejax.tools.bench`."""

import sys

from fmcejax.tools.bench import main

if __name__ == "__main__":
  main(sys.argv[1:])
