# Shared by the launch scripts (sourced, never run): the project's environment, option errors, the CONFIG
# argument, value checks. Each script defines usage().

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The project's environment: the clone's .venv (made by `make setup` / `make demo`) when no virtualenv is
# active, so that the scripts work in a new shell without `source .venv/bin/activate`; otherwise the
# active one. Either must have lmforge, torch and deepspeed, or the script stops here with one line.
if [[ -z ${VIRTUAL_ENV:-} && -x $ROOT/.venv/bin/python ]]; then
  export PATH="$ROOT/.venv/bin:$PATH"
fi
need_env() {
  local py=${PYTHON:-python}
  if ! command -v "$py" >/dev/null 2>&1 || ! command -v deepspeed >/dev/null 2>&1 \
     || ! "$py" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("lmforge.trainer", "torch", "deepspeed")))' 2>/dev/null; then
    echo "error: no Python environment with lmforge, torch and deepspeed (python: $(command -v "$py" || echo none), deepspeed: $(command -v deepspeed || echo none)): run \`make setup\` in $ROOT (its .venv is found by these scripts), or activate an environment where lmforge is installed" >&2
    exit 2
  fi
}

# In a getopts loop: `:|\?) opt_error "$opt" "$OPTARG" ;;`
opt_error() {
  if [[ $1 == ":" ]]; then echo "error: -$2 needs a value" >&2; else echo "error: unknown option -$2" >&2; fi
  usage >&2
  exit 2
}

# need_config "$@": the first positional argument must be an existing config file; sets CONFIG.
need_config() {
  if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi
  CONFIG=$1
  [[ -f $CONFIG ]] || { echo "error: config $CONFIG not found" >&2; exit 2; }
}

# check_posint FLAG VALUE [allow-empty]
check_posint() {
  [[ ( -z $2 && -n ${3:-} ) || $2 =~ ^[1-9][0-9]*$ ]] || {
    echo "error: $1 must be a positive integer, got '$2'" >&2; exit 2; }
}

check_port() {
  [[ $1 =~ ^[0-9]+$ ]] || { echo "error: -p must be a port number, got '$1'" >&2; exit 2; }
}
