# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run).
#
#   run CMD ARGS...   runs the command, or with DRY_RUN=1 prints it (shell-quoted, one line,
#                     prefixed by "+ ") and runs nothing.
#   die MSG           prints "error: MSG" to stderr and exits 2.
#   need VAR NAME     dies unless variable VAR is non-empty (NAME is the option that sets it).
#   usage [CODE]      prints the running script's header comment (its help) and exits CODE.

DRY_RUN="${DRY_RUN:-0}"

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {  # the header of the script that was run (the last entry of BASH_SOURCE)
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[-1]}" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-0}"
}

need() {
  local var="$1" opt="$2"
  [[ -n "${!var:-}" ]] || die "$opt is required (or set \$$var)"
}

quote_cmd() {  # one shell-readable line: plain words as they are, the rest in single quotes
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}
