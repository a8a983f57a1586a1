"""What every `python -m fmcejax.X` command shares: --help, typo suggestions, its own usage.

A command is a `Command` (its module, flags, documented config dicts and examples); `parse` reads
its command line with absl and ml_collections. The help text is read from the source files
(`configs/default.py`'s fields, comments and groups, each shipped config's docstring, the study's
`study_config`), so it cannot drift from them, and neither `--help` nor a typo imports jax.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib.resources
import importlib.util
import io
import os
import sys
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags.config_flags import ConfigFileFlagParser  # not re-exported

from fmcejax.config_lib import ConfigError

EXIT_BAD_INPUT = 2
HELP_FLAGS = ("-h", "--help", "-help", "--helpfull", "--helpshort")
DEFAULT_CONFIG = "mnist_cnn"
CONFIG_SCHEMA = "fmcejax.configs.default:get_config"


class CommandLineError(ValueError):
  """A flag that does not parse (an unknown flag or config field, a value of the wrong type)."""


@dataclasses.dataclass(frozen=True)
class ConfigDictFlag:
  """A `--NAME.FIELD=VALUE` flag over a fixed ConfigDict, e.g. the study's grid."""

  name: str
  default: Callable[[], ml_collections.ConfigDict]
  source: str  # "package.module:function" whose assignments and comments document the fields
  help: str


@dataclasses.dataclass(frozen=True)
class Command:
  """One command: `python -m {module} {usage}`. `define` defines its own absl flags (besides
  `--config`, which every command has); `dicts` are its config-dict flags."""

  module: str
  summary: str
  usage: str
  examples: tuple[str, ...]
  define: Callable[[], None] = lambda: None
  dicts: tuple[ConfigDictFlag, ...] = ()

  def usage_line(self) -> str:
    return f"python -m {self.module} {self.usage}"


def fail(message: str) -> int:
  print(f"fmcejax: error: {message}", file=sys.stderr)
  return EXIT_BAD_INPUT


def shipped_configs() -> dict[str, str]:
  """Name -> path of every config that ships with the package (`configs/` in a checkout)."""
  root = importlib.resources.files("fmcejax.configs")
  return {
    p.name.removesuffix(".py"): os.fspath(p)
    for p in root.iterdir()
    if p.name.endswith(".py") and p.name not in ("__init__.py", "default.py")
  }


def _config_index(argv: Sequence[str]) -> int | None:
  return next((i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")), None)


def config_first(argv: Sequence[str]) -> list[str]:
  """`argv` with `--config` (and its value) moved before every other flag: ml_collections reads
  overrides only after it, and `--config.epochs=3 --config=NAME` is a common habit."""
  argv, i = list(argv), _config_index(argv)
  if i is None or i == 1:
    return argv
  n = 1 if "=" in argv[i] or i + 1 == len(argv) else 2
  return [argv[0], *argv[i : i + n], *argv[1:i], *argv[i + n :]]


def resolve_config_arg(argv: Sequence[str]) -> list[str]:
  """`argv` with `--config` as a file path: a shipped name becomes its file, and a path that does
  not exist is a ConfigError (before ml_collections would raise it as a traceback)."""
  argv, shipped = list(argv), shipped_configs()
  i = _config_index(argv)
  if i is None or (argv[i] == "--config" and i + 1 == len(argv)):
    return argv
  j, value = (i, argv[i].split("=", 1)[1]) if "=" in argv[i] else (i + 1, argv[i + 1])
  file, sep, rest = value.partition(":")  # ml_collections' `path:argument` form
  if file.removesuffix(".py") in shipped and not os.path.isfile(file):
    file = shipped[file.removesuffix(".py")]
  if not os.path.isfile(file):
    raise ConfigError(
      "config",
      value,
      "a Python config file (ml_collections style) or the name of a "
      f"shipped config: {', '.join(sorted(shipped))}",
      "No such file.",
    )
  argv[j] = f"--config={file}{sep}{rest}" if j == i else f"{file}{sep}{rest}"
  return argv


def _config_value(argv: Sequence[str]) -> str:
  i = _config_index(argv)
  if i is None:
    return shipped_configs()[DEFAULT_CONFIG]
  return argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  """Dotted field path -> value, for every field that is not itself a ConfigDict."""
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out |= _leaves(value, f"{prefix}{key}.")
    else:
      out[f"{prefix}{key}"] = value
  return out


def _did_you_mean(word: str, candidates: Sequence[str], prefix: str = "") -> str:
  close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
  return f"; did you mean {' or '.join(prefix + c for c in close)}?" if close else ""


def check_argv(argv: Sequence[str], dicts: dict[str, ml_collections.ConfigDict]) -> None:
  """Raises CommandLineError for an unknown flag or field (naming the nearest ones), a flag that
  needs a value and has none (with an example), or a stray argument. `dicts`: the config-dict
  flags by name; every other flag must be defined in absl's FLAGS already."""
  known = sorted({*flags.FLAGS, *dicts})
  args, i = list(argv[1:]), 0
  while i < len(args):
    arg, i = args[i], i + 1
    if not arg.startswith("-"):
      hint = f"; did you mean --config={arg}?" if arg in shipped_configs() else ""
      raise CommandLineError(f"unexpected argument {arg!r}{hint}")
    name, has_value = arg.lstrip("-").split("=", 1)[0], "=" in arg
    root, _, path = name.partition(".")
    root = root[2:] if path and root.startswith("no") and root[2:] in dicts else root
    if path and root in dicts:
      fields = _leaves(dicts[root])
      if path not in fields and not any(f.startswith(path + ".") for f in fields):
        raise CommandLineError(
          f"no {root} field {path!r}{_did_you_mean(path, list(fields), f'--{root}.')}"
        )
      value = fields.get(path)
      takes_value = path in fields and not isinstance(value, bool)
    elif name in dicts:
      takes_value, value = True, None
    elif name in flags.FLAGS or (name.startswith("no") and name[2:] in flags.FLAGS):
      flag = flags.FLAGS[name if name in flags.FLAGS else name[2:]]
      takes_value, value = not flag.boolean, flag.value
    else:
      raise CommandLineError(f"unknown flag --{name}{_did_you_mean(name, known, '--')}")
    if takes_value and not has_value:
      if i < len(args) and not args[i].startswith("--"):
        i += 1  # `--flag value`
      else:
        example = value if value not in ("", None) else "VALUE"
        raise CommandLineError(f"--{name} needs a value, e.g. --{name}={example}")


def parse(command: Command, argv: Sequence[str]) -> ml_collections.ConfigDict:
  """The config of `command`'s command line (`argv[0]` is the program; the command's other flags
  are in `absl.flags.FLAGS`). Prints the help and exits 0 on -h/--help; raises CommandLineError
  or ConfigError naming the command's own usage on bad input. Imports nothing heavy."""
  want_help = any(a in HELP_FLAGS for a in argv)
  argv = [a for a in argv if a not in HELP_FLAGS]
  if _config_index(argv) is None:  # explicit, so that no flag parses while being defined
    argv.insert(1, f"--config={shipped_configs()[DEFAULT_CONFIG]}")
  argv = resolve_config_arg(config_first(argv))
  usage = f" Usage: {command.usage_line()} (--help lists every flag and field)"
  before = set(flags.FLAGS)
  try:
    command.define()
    own = [flags.FLAGS[name] for name in flags.FLAGS if name not in before]
    dicts = {d.name: d.default() for d in command.dicts}
    dicts["config"] = ConfigFileFlagParser("config").parse(_config_value(argv))
    check_argv(argv, dicts)  # ml_collections reads the overrides while defining the flags
    for d in command.dicts:
      config_flags.DEFINE_config_dict(d.name, dicts[d.name], d.help, sys_argv=argv)
    config_flag = config_flags.DEFINE_config_file(
      "config",
      shipped_configs()[DEFAULT_CONFIG],
      "Python config file (ml_collections) or the name of a shipped config.",
      lock_config=True,
      sys_argv=argv,
    )
    flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError, OSError) as e:
    end = "" if str(e).endswith("?") else "."
    raise CommandLineError(f"bad command line: {e}{end}{usage}") from None
  if want_help:
    values = {d.name: flags.FLAGS[d.name].value for d in command.dicts}
    print(help_text(command, own, _config_value(argv), config_flag.value, values))
    raise SystemExit(0)
  return config_flag.value


def argument_parser(module: str, doc: str, examples: Sequence[str]) -> argparse.ArgumentParser:
  """argparse for the commands without a config (the benchmarks): usage, summary, examples."""
  return argparse.ArgumentParser(
    prog=f"python -m {module}",
    description=doc.splitlines()[0],
    epilog="examples:\n" + "\n".join(f"  {e}" for e in examples),
    formatter_class=argparse.RawDescriptionHelpFormatter,
    allow_abbrev=False,  # as absl: a prefix is a typo, not a flag
  )


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
  """`parser.parse_args(argv)`, naming the nearest flags for an unknown one (exit 2)."""
  args, unknown = parser.parse_known_args(argv)
  if unknown:
    name = unknown[0].split("=", 1)[0]
    known = list(parser._option_string_actions)  # argparse keeps no public list of its flags
    if name.startswith("-"):
      parser.error(f"unknown flag {name}{_did_you_mean(name, known)}")
    parser.error(f"unexpected argument {name!r}")
  return args


# ---------------------------------------------------------------------------------------------
# --help, read from the source files.


def _source(module: str) -> str:
  """A module's source, found without importing it."""
  with open(importlib.util.find_spec(module).origin) as f:
    return f.read()


def documented_fields(where: str) -> list[tuple[str, list[tuple[str, str]]]]:
  """[(group title, [(field, comment)])] of the function `where` ("module:function"), from its
  source: each `root.a.b = value  # comment` is field `a.b`; a comment block that opens a
  paragraph titles the fields below it with its first line (the rest describes the next field),
  one right under a field describes the next field."""
  module, function = where.split(":")
  source = _source(module)
  comments = {
    tok.start[0]: tok.string.lstrip("#").strip()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline)
    if tok.type == tokenize.COMMENT
  }
  node = next(
    n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef) and n.name == function
  )
  lines = source.splitlines()
  groups, last_field = [(_first_sentence(ast.get_docstring(node) or ""), [])], 0
  for stmt in node.body:
    top = stmt.lineno - 1
    while top > 0 and lines[top - 1].lstrip().startswith("#"):
      top -= 1
    above = [comments[n] for n in range(top + 1, stmt.lineno)]
    if above and top != last_field:
      groups.append((above[0], []))
      above = above[1:]
    target = stmt.targets[0] if isinstance(stmt, ast.Assign) else None
    if not isinstance(target, ast.Attribute) or isinstance(stmt.value, ast.Call):
      continue  # not a field: the root or a nested ConfigDict
    trailing = [comments[n] for n in range(stmt.lineno, stmt.end_lineno + 1) if n in comments]
    path = ast.unparse(target).split(".", 1)[1]
    groups[-1][1].append((path, " ".join(above + trailing)))
    last_field = stmt.end_lineno
  return [(title, fields) for title, fields in groups if fields]


def _fields_text(where: str, config: ml_collections.ConfigDict, width: int = 100) -> list[str]:
  """The fields of `config`, grouped and commented as `where` documents them."""
  values, lines = _leaves(config), []
  groups = documented_fields(where)
  documented = {path for _, fields in groups for path, _ in fields}
  extra = [(path, "") for path in values if path not in documented]
  for title, fields in [*groups, *([("Not in the schema's source.", extra)] if extra else [])]:
    lines.append(f"  {title}")
    for path, comment in fields:
      if path in values:
        left = f"    {path} = {values[path]!r}"
        lines.append(
          textwrap.fill(
            comment,
            width,
            initial_indent=f"{left:<40} " if len(left) < 40 else f"{left}  ",
            subsequent_indent=" " * 41,
            break_on_hyphens=False,
          )
          if comment
          else left
        )
  return lines


def _first_sentence(doc: str) -> str:
  return " ".join(doc.split("\n\n")[0].split()).split(". ")[0].removesuffix(".") + "."


def _summary(path: str) -> str:
  """The first sentence of a file's docstring."""
  with open(path) as f:
    return _first_sentence(ast.get_docstring(ast.parse(f.read())) or "")


def help_text(
  command: Command,
  own: list[flags.Flag],
  config_file: str,
  config: ml_collections.ConfigDict,
  dicts: dict[str, ml_collections.ConfigDict],
) -> str:
  """The whole --help: usage, flags, shipped configs, every field with its value and comment,
  examples. `config` and `dicts` hold this command line's values."""
  shipped = shipped_configs()
  name = {p: n for n, p in shipped.items()}.get(config_file.split(":")[0], config_file)
  flag_lines = [f"  --config={name}".ljust(41) + " a config file or a shipped config's name"]
  for flag in own:
    flag_lines.append(f"  --{flag.name}={flag.value}".ljust(41) + f" {flag.help}")
  for d in command.dicts:
    flag_lines.append(f"  --{d.name}.FIELD=VALUE".ljust(41) + f" {d.help}")
  flag_lines.append(
    "  -h, --help".ljust(41) + " this text; with --config=NAME, that config's values"
  )
  configs = [
    textwrap.fill(
      _summary(p),
      100,
      initial_indent=f"  {n + (' (default)' if n == DEFAULT_CONFIG else ''):<39} ",
      subsequent_indent=" " * 42,
      break_on_hyphens=False,
    )
    for n, p in sorted(shipped.items())
  ]
  text = [command.summary, "", f"usage: {command.usage_line()}", "", "flags:", *flag_lines]
  text += ["", "shipped configs (--config=NAME):", *configs, ""]
  for d in command.dicts:
    text += [f"{d.name} fields (--{d.name}.FIELD=VALUE):"]
    text += [*_fields_text(d.source, dicts[d.name]), ""]
  text += [f"config fields (--config.FIELD=VALUE), the values of {name} on this command line:"]
  text += [*_fields_text(CONFIG_SCHEMA, config), "", "examples:"]
  return "\n".join(text + [f"  {e}" for e in command.examples])
