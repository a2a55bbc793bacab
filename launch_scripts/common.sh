# Shared by the launch scripts (sourced, never run): option errors, the CONFIG argument, value checks,
# and the repository on PYTHONPATH so `trainer` imports from any directory. Each script defines usage().

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

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
