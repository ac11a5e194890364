#!/usr/bin/env bash
# What the dashboard's browser tests (tests/e2e_dashboard.rs) need, idempotent:
#   - Debian's `chromium` at /usr/bin/chromium (apt-get; sudo only when not root),
#   - Node.js >= 18 (apt-get `nodejs npm` when node is missing),
#   - `playwright-core` (pinned; the driver only, no bundled browsers) in .cache/browser (ignored by
#     git), which dashboard/tests/dashboard.spec.mjs loads from there.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
env="$root/.cache/browser"
# 1.56.1 runs on Node.js >= 18 (Debian 12's own nodejs; 1.65 needs 20) and drives current Chromium.
playwright_version="1.56.1"

sudo=""
if [ "$(id -u)" != 0 ]; then
  sudo="sudo"
fi

missing=()
# fonts-liberation (a recommendation we skip installing) gives the screenshots readable text.
[ -x /usr/bin/chromium ] || missing+=(chromium fonts-liberation)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]} with apt-get ..."
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 18 ]; then
  echo "Node.js $(node --version) is too old for playwright-core $playwright_version (needs >= 18)" >&2
  exit 1
fi

installed=$(node -p "try { require('$env/node_modules/playwright-core/package.json').version } catch { '' }")
if [ "$installed" = "$playwright_version" ]; then
  exit 0
fi
echo "installing playwright-core@$playwright_version into $env ..."
mkdir -p "$env"
if [ ! -f "$env/package.json" ]; then
  echo '{"name": "lumen-browser-env", "private": true}' >"$env/package.json"
fi
# The browser comes from Debian: never let playwright download its own.
PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$env" --no-audit --no-fund --silent \
  "playwright-core@$playwright_version"
