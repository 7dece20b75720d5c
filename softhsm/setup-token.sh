#!/usr/bin/env bash
# Create (idempotently) a project-private SoftHSM2 configuration and a token found by its label.
#
#   HSM_KEYS_SOFTHSM_DIR   where config and token files live      (default: ./.softhsm)
#   HSM_KEYS_TOKEN_LABEL   token label                             (default: hsm-keys-dev)
#   HSM_KEYS_PIN           user PIN             } required, unless --dev is given: then throwaway
#   HSM_KEYS_SO_PIN        security-officer PIN } random PINs are made once and kept in
#                                                 $HSM_KEYS_SOFTHSM_DIR/{user,so}.pin (mode 600)
#
# Never touches /etc/softhsm or a user's default token store. Prints the exports to use.
set -euo pipefail

dev=0
[ "${1:-}" = "--dev" ] && dev=1

here=$(cd "$(dirname "$0")" && pwd)
dir=${HSM_KEYS_SOFTHSM_DIR:-$(pwd)/.softhsm}
label=${HSM_KEYS_TOKEN_LABEL:-hsm-keys-dev}

umask 077
mkdir -p "$dir/tokens"
if [ "$dev" = 1 ]; then
  for who in user so; do
    [ -s "$dir/$who.pin" ] || od -An -N12 -tx1 /dev/urandom | tr -d ' \n' > "$dir/$who.pin"
  done
  : "${HSM_KEYS_PIN:=$(cat "$dir/user.pin")}"
  : "${HSM_KEYS_SO_PIN:=$(cat "$dir/so.pin")}"
fi
if [ -z "${HSM_KEYS_PIN:-}" ] || [ -z "${HSM_KEYS_SO_PIN:-}" ]; then
  echo "setup-token: set HSM_KEYS_PIN and HSM_KEYS_SO_PIN (or pass --dev for throwaway development PINs)" >&2
  exit 2
fi

module=""
for candidate in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so \
                 /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
  if [ -f "$candidate" ]; then module=$candidate; break; fi
done
if [ -z "$module" ] || ! command -v softhsm2-util >/dev/null; then
  echo "setup-token: SoftHSM2 is not installed (Debian/Ubuntu: apt-get install softhsm2)" >&2
  exit 3
fi

chmod 700 "$dir"
conf="$dir/softhsm2.conf"
sed "s|@TOKENDIR@|$dir/tokens|" "$here/softhsm2.conf.in" > "$conf.tmp"
mv "$conf.tmp" "$conf"
export SOFTHSM2_CONF=$conf

if softhsm2-util --show-slots 2>/dev/null | grep -Eq "^[[:space:]]*Label:[[:space:]]+$label[[:space:]]*$"; then
  echo "# token '$label' already present in $dir/tokens" >&2
else
  softhsm2-util --init-token --free --label "$label" --so-pin "$HSM_KEYS_SO_PIN" --pin "$HSM_KEYS_PIN" >/dev/null
  echo "# initialised token '$label' in $dir/tokens" >&2
fi

echo "export SOFTHSM2_CONF=$conf"
echo "export HSM_KEYS_PKCS11_MODULE=$module"
echo "export HSM_KEYS_TOKEN_LABEL=$label"
if [ "$dev" = 1 ]; then
  echo "export HSM_KEYS_PIN_FILE=$dir/user.pin"
else
  echo "# export HSM_KEYS_PIN=<the user PIN you chose>"
fi
