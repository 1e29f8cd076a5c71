#!/usr/bin/env bash
# Installs Azurite's blob emulator (npm azurite@3.35.0, the last release for Node 20) into .ci/node/, git-ignored.
# Idempotent: does nothing when that version is already there. The Azure ML push/pull tests start it themselves.
set -euo pipefail
VERSION=3.35.0
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PREFIX="$ROOT/.ci/node"
installed=$(node -p "require('$PREFIX/node_modules/azurite/package.json').version" 2>/dev/null || true)
if [ "$installed" = "$VERSION" ] && [ -x "$PREFIX/node_modules/.bin/azurite-blob" ]; then
  echo "azurite $VERSION already in $PREFIX"
  exit 0
fi
command -v npm >/dev/null || { echo "install-azurite: npm not found; install Node.js 20 (apt-get install nodejs npm)" >&2; exit 1; }
mkdir -p "$PREFIX"
# A private package.json keeps npm from walking up into anything else; --no-save leaves no lock file to drift.
[ -f "$PREFIX/package.json" ] || echo '{"private": true}' >"$PREFIX/package.json"
npm install --prefix "$PREFIX" --no-audit --no-fund --no-save --loglevel=error "azurite@$VERSION"
"$PREFIX/node_modules/.bin/azurite-blob" --version >/dev/null
echo "azurite $VERSION installed in $PREFIX"
