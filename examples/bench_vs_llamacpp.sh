#!/usr/bin/env bash
# Single-machine prefill and decode tokens/s: potluck's engine against llama.cpp on the same
# GGUF, the same prompt token ids and the same thread count, measured in the same run and
# interleaved (ours, theirs, ours, theirs…) so a noisy machine hurts both alike.
#
#   examples/bench_vs_llamacpp.sh [--threads N] [--rounds R] [--model PATH]
#
# llama.cpp comes from the PyPI package llama-cpp-python==0.3.36 (it vendors llama.cpp),
# built once into ~/.cache/potluck/llamacpp/venv (takes a few minutes the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=1 ROUNDS=3 MODEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
CACHE="${POTLUCK_CACHE_DIR:-$HOME/.cache/potluck}"
VENV="$CACHE/llamacpp/venv"
cargo build --release --quiet -p potluck-coordinator -p potluck-examples
[ -n "$MODEL" ] || MODEL="$(target/release/coordinator fetch-model)"
if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
  echo "==> building llama-cpp-python==0.3.36 into $VENV (once)" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet "llama-cpp-python==0.3.36" numpy
fi
# llama.cpp builds for the CPU it is built on (-march=native). A VM may list instructions the
# hypervisor does not let it run (AMX tiles on some Xeon VMs: "Illegal instruction"); then
# rebuild once for this CPU's AVX/AVX-512 feature flags, without AMX.
smoke() {
  "$VENV/bin/python" -c "import llama_cpp, sys; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False); m.eval([1, 2, 3])" "$MODEL" 2>/dev/null
}
if ! smoke; then
  flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
  args="-DGGML_NATIVE=OFF"
  for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx_vnni:AVX_VNNI avx512f:AVX512 avx512vbmi:AVX512_VBMI \
    avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    [[ "$flags" == *" ${pair%%:*} "* ]] && args+=" -DGGML_${pair#*:}=ON"
  done
  echo "==> llama.cpp's native build does not run here; rebuilding with $args" >&2
  CMAKE_ARGS="$args" "$VENV/bin/pip" install --quiet --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==0.3.36"
  smoke || { echo "llama.cpp still does not run on this machine" >&2; exit 1; }
fi
echo "model: $MODEL  threads: $THREADS  rounds: $ROUNDS  cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" >&2
OUT=$(mktemp)
for r in $(seq "$ROUNDS"); do
  target/release/engine-bench --model "$MODEL" --threads "$THREADS" | tail -1 | sed "s/^/potluck round$r /" >> "$OUT"
  "$VENV/bin/python" examples/llamacpp_bench.py --model "$MODEL" --threads "$THREADS" | tail -1 | sed "s/^/llamacpp round$r /" >> "$OUT"
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = {"potluck": [], "llamacpp": []}
for line in open(sys.argv[1]):
    who, _, js = line.split(" ", 2)
    rows[who].append(json.loads(js))
med = lambda who, k: statistics.median(r[k] for r in rows[who])
print(f"{'':10} {'prefill tok/s':>14} {'decode tok/s':>13}")
for who in rows:
    print(f"{who:10} {med(who,'prefill_tok_s'):14.1f} {med(who,'decode_tok_s'):13.1f}")
print(f"{'ratio':10} {med('potluck','prefill_tok_s')/med('llamacpp','prefill_tok_s'):14.2f} "
      f"{med('potluck','decode_tok_s')/med('llamacpp','decode_tok_s'):13.2f}   (potluck / llama.cpp, medians of per-round medians)")
PY
rm -f "$OUT"
