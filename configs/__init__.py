"""The shipped configs; installed as `fmcejax.configs` (see pyproject.toml)."""
