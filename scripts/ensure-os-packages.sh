#!/usr/bin/env bash
# Install the OS packages the project needs, if missing: softhsm2 (the development HSM) and
# opensc (pkcs11-tool, the operator's baseline in the benchmarks). Debian/Ubuntu only.
set -euo pipefail

missing=()
command -v softhsm2-util >/dev/null || missing+=(softhsm2)
command -v pkcs11-tool >/dev/null || missing+=(opensc)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" = 0 ]; then
  sudo=()
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  echo "ensure-os-packages: missing ${missing[*]}; install them as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null; then
  echo "ensure-os-packages: missing ${missing[*]} and no apt-get here; install them with your package manager" >&2
  exit 1
fi
echo "installing OS packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
