# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run). A dry run uses no external program:
# it prints every command, shell-quoted so it can be pasted, and runs nothing.

DRY_RUN="${DRY_RUN:-0}"
PROG="${0##*/}"
SAFE_WORD='^[-A-Za-z0-9_./:=,@%+]+$'
FLAG_VALUE='^(--[A-Za-z0-9_.-]+=)(.*)$'

# Prints its arguments as one shell command line, quoting only the words (or, for a
# --flag=value word, the values) that need it.
quote() {
  local out="" word flag
  for word in "$@"; do
    flag=""
    if [[ ! "$word" =~ $SAFE_WORD && "$word" =~ $FLAG_VALUE ]]; then
      flag="${BASH_REMATCH[1]}"
      word="${BASH_REMATCH[2]}"
    fi
    if [[ "$word" =~ $SAFE_WORD ]]; then
      out+="$flag$word "
    else
      out+="$flag'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

# Runs a command (echoed to stderr first), or only prints it (to stdout) in a dry run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    printf '+ %s\n' "$(quote "$@")" >&2
    "$@"
  fi
}

note() {
  printf '%s: %s\n' "$PROG" "$*" >&2
}

die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

need() {  # need PROGRAM HINT: fails unless PROGRAM is installed (skipped in a dry run)
  [[ "$DRY_RUN" == 1 ]] || command -v "$1" >/dev/null 2>&1 || die "$1 not found. $2"
}
