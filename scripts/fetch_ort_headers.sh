#!/usr/bin/env bash
# Fetch the onnxruntime C/C++ API headers (ORT 1.21, API 21) from Debian trixie's
# libonnxruntime-dev into third_party/ort/include, so CMake can build the AtPatch kernel.
#
# Why this way: the headers are all the kernel needs (it links nothing from onnxruntime),
# and Debian ships them as a small arch-independent-enough .deb. apt runs under a PRIVATE
# state/cache/sources directory: nothing from trixie is ever installed into this system.
# Idempotent: returns at once when the headers are already there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/third_party/ort"
HEADER="onnxruntime_cxx_api.h"

if [ -f "$DEST/include/$HEADER" ] && [ "${1:-}" != "--force" ]; then
  echo "fetch_ort_headers: headers already in $DEST/include"
  exit 0
fi

# Use the same Debian mirror the machine's apt already uses (deb822 or one-line format).
# Comment lines are skipped: deb822 files often carry a commented snapshot URL.
mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list \
  2>/dev/null | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]*/debian/?( |$)' | head -n1 | tr -d ' ' || true)"
mirror="${ATPATCH_DEBIAN_MIRROR:-${mirror:-http://deb.debian.org/debian}}"
mirror="${mirror%/}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/etc/sources.list.d" \
  "$work/etc/preferences.d" "$work/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
  >"$work/etc/sources.list"
: >"$work/status"

apt_opts=(
  -o "Dir::State=$work"
  -o "Dir::State::Lists=$work/lists"
  -o "Dir::State::status=$work/status"
  -o "Dir::Etc::SourceList=$work/etc/sources.list"
  -o "Dir::Etc::SourceParts=$work/etc/sources.list.d"
  -o "Dir::Etc::Preferences=$work/etc/preferences"
  -o "Dir::Etc::PreferencesParts=$work/etc/preferences.d"
  -o "Dir::Cache=$work/cache"
  -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache="
  -o "APT::Get::List-Cleanup=0"
  -o "Debug::NoLocking=1"
  -o "Acquire::Languages=none"
  -o "APT::Sandbox::User=root"
)

echo "fetch_ort_headers: downloading libonnxruntime-dev from $mirror trixie"
apt-get "${apt_opts[@]}" -qq update
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download libonnxruntime-dev)

deb="$(ls "$work"/debs/libonnxruntime-dev_*.deb | head -n1)"
dpkg -x "$deb" "$work/root"
src="$(dirname "$(find "$work/root" -name "$HEADER" | head -n1)")"
if [ ! -f "$src/$HEADER" ]; then
  echo "fetch_ort_headers: $HEADER not found in $(basename "$deb"); the package layout changed" >&2
  exit 1
fi

rm -rf "$DEST/include.tmp"
mkdir -p "$DEST"
cp -r "$src" "$DEST/include.tmp"
rm -rf "$DEST/include"
mv "$DEST/include.tmp" "$DEST/include"
basename "$deb" >"$DEST/SOURCE"
echo "fetch_ort_headers: headers from $(basename "$deb") in $DEST/include"
