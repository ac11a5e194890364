#!/usr/bin/env bash
# Open WebUI against Lumen, end to end (not part of scripts/test.sh: Open WebUI and its
# dependencies are ~2 GB). It
#   1. installs Open WebUI from PyPI (`open-webui`, pinned) into .cache/openwebui (once),
#   2. starts `lumen serve` (target/release/lumen, the default SmolLM2 model) on free ports,
#   3. starts Open WebUI pointed at it (OPENAI_API_BASE_URLS=http://127.0.0.1:PORT/v1, no login:
#      WEBUI_AUTH=False, offline: no hub downloads, no telemetry, no embedding model),
#   4. drives one chat in headless Chromium (scripts/browser-env.sh's playwright-core and Debian
#      chromium): the answer must grow while it streams and end non-empty, and Lumen's request
#      log must show the streamed chat completion, answered 200,
#   5. saves a screenshot to docs/images/openwebui-chat.png (OUT=... to write elsewhere).
# Everything listens on 127.0.0.1 and stops when the script ends.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
env="$root/.cache/openwebui"
openwebui_version="${OPENWEBUI_VERSION:-0.12.4}"
shot="${OUT:-$root/docs/images/openwebui-chat.png}"
prompt="${PROMPT:-Write a haiku about the sea.}"
model_name="SmolLM2-135M-Instruct"

./scripts/fetch-model.sh >/dev/null
./scripts/browser-env.sh
if ! "$env/bin/python" -c "import sys; from importlib.metadata import version; sys.exit(version('open-webui') != '$openwebui_version')" 2>/dev/null; then
  echo "installing open-webui==$openwebui_version into $env (large: torch and friends) ..."
  python3 -m venv "$env"
  "$env/bin/pip" install --quiet --disable-pip-version-check "open-webui==$openwebui_version"
fi
[ -x target/release/lumen ] || cargo build --release --bin lumen

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# Lumen: ports from its ready line.
mkfifo "$work/ready"
LUMEN_LOG=warn target/release/lumen serve --host 127.0.0.1 --port 0 --dashboard-port 0 --grpc-port 0 \
  --served-model-name "$model_name" >"$work/ready" 2>"$work/lumen.log" &
pids+=($!)
ready=$(timeout 120 head -n 1 "$work/ready") || { cat "$work/lumen.log"; exit 1; }
api=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["listen"]["api"].rsplit(":", 1)[1])' "$ready")
dashboard=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["listen"]["dashboard"].rsplit(":", 1)[1])' "$ready")
echo "lumen serve: API on 127.0.0.1:$api, dashboard on 127.0.0.1:$dashboard"

# Open WebUI.
webui=$(free_port)
mkdir -p "$work/webui"
(
  cd "$work/webui"
  exec env DATA_DIR="$work/webui" \
    OPENAI_API_BASE_URLS="http://127.0.0.1:$api/v1" OPENAI_API_KEYS=unused \
    WEBUI_AUTH=False WEBUI_SECRET_KEY=openwebui-check ENABLE_OLLAMA_API=False \
    OFFLINE_MODE=True HF_HUB_OFFLINE=1 RAG_EMBEDDING_ENGINE=openai BYPASS_EMBEDDING_AND_RETRIEVAL=True \
    ANONYMIZED_TELEMETRY=False DO_NOT_TRACK=True SCARF_NO_ANALYTICS=True ENABLE_VERSION_UPDATE_CHECK=False \
    "$env/bin/open-webui" serve --host 127.0.0.1 --port "$webui"
) >"$work/webui.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$webui/health" >/dev/null && break
  sleep 1
done
curl -sf "http://127.0.0.1:$webui/health" >/dev/null || { tail -50 "$work/webui.log"; echo "Open WebUI did not start" >&2; exit 1; }
echo "open-webui $openwebui_version on 127.0.0.1:$webui"

# The browser.
cat >"$work/chat.mjs" <<'JS'
// Opens Open WebUI, sends the prompt to the selected model, samples the answer while it
// streams until Lumen's log shows the stream ended, saves a screenshot, prints {answer, growth}.
import { createRequire } from 'module';
const [,, base, model, shot, prompt, requests] = process.argv;
// Lumen's request log has a streamed chat completion once it has ended.
const streamEnded = async () => {
  const log = await fetch(requests).then((r) => r.json()).catch(() => ({ requests: [] }));
  return log.requests.some((r) => r.route === 'chat' && r.stream);
};
const require = createRequire(process.env.BROWSER_ENV + '/package.json');
const { chromium } = require('playwright-core');
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
const fail = async (why) => {
  await page.screenshot({ path: shot.replace(/\.png$/, '-failed.png') }).catch(() => {});
  console.error('openwebui-check: ' + why);
  await browser.close();
  process.exit(1);
};
await page.goto(base + '/', { waitUntil: 'domcontentloaded', timeout: 60000 });
await page.locator('#chat-input').waitFor({ timeout: 60000 });
// A first visit shows the release notes.
const okay = page.getByRole('button', { name: /Okay, Let's Go/i });
await okay.waitFor({ timeout: 5000 }).then(() => okay.click()).catch(() => {});
const shown = await page.locator('body').innerText();
if (!shown.includes(model)) await fail(`the model ${model} is not selected:\n${shown.slice(0, 500)}`);
await page.locator('#chat-input').click();
await page.keyboard.type(prompt);
await page.keyboard.press('Enter');
const answer = page.locator('#response-content-container').last();
await answer.waitFor({ timeout: 60000 }).catch(() => fail('no answer appeared'));
const growth = [];
const deadline = Date.now() + 120000;
let unchanged = 0;
while (Date.now() < deadline) {
  const text = (await answer.innerText().catch(() => '')).trim();
  if (growth.length === 0 || text.length !== growth[growth.length - 1]) { growth.push(text.length); unchanged = 0; }
  else unchanged += 1;
  if (text.length > 0 && unchanged >= 10 && (await streamEnded())) break;
  await page.waitForTimeout(50);
}
const final = (await answer.innerText()).trim();
if (!final) await fail('the answer stayed empty');
if (!(await streamEnded())) await fail('the streamed request never ended');
await page.waitForTimeout(1500);
await page.screenshot({ path: shot });
console.log(JSON.stringify({ answer: final, growth }));
await browser.close();
JS
mkdir -p "$(dirname "$shot")"
result=$(BROWSER_ENV="$root/.cache/browser" timeout 300 node "$work/chat.mjs" "http://127.0.0.1:$webui" "$model_name" "$shot" "$prompt" \
  "http://127.0.0.1:$dashboard/api/requests?limit=50")
echo "$result"

# The answer streamed in the page, and Lumen answered a streamed chat completion.
python3 - "$result" "http://127.0.0.1:$dashboard/api/requests?limit=50" <<'PY'
import json, sys, urllib.request
result = json.loads(sys.argv[1])
growth = [n for n in result["growth"] if n > 0]
assert len(growth) >= 3, f"the answer did not grow while streaming: {result['growth']}"
log = json.load(urllib.request.urlopen(sys.argv[2]))["requests"]
streamed = [r for r in log if r["route"] == "chat" and r["stream"] and r["status"] == 200 and r["completion_tokens"] > 0]
assert streamed, f"no streamed chat completion in Lumen's request log: {log}"
r = streamed[-1]
print(f"ok: Open WebUI streamed a {r['completion_tokens']}-token answer from Lumen "
      f"(ttft {r['ttft_ms']:.0f} ms, {r['duration_ms']:.0f} ms); the page showed it in {len(growth)} steps")
PY
echo "screenshot: $shot ($(du -k "$shot" | cut -f1) KB)"
