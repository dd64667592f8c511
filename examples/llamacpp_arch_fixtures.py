"""Records llama.cpp's log-probabilities on seeded random-weight GGUFs of each dense
architecture the engine runs (llama, qwen2, qwen3, phi3, and the mixtures of experts: Mixtral's
layout and qwen3moe), for engine/tests/arch_agreement.rs.

Each model is written by the repository's own writer (`random_gguf` example: same arguments,
byte-identical file; its sha256 goes into the fixture so the test knows it rebuilt the same
one), with the default model's tokenizer. llama.cpp (llama-cpp-python 0.3.36, the commit of
every other reference) evaluates one token sequence teacher-forced (a prompt in one step, then one token per
step), once with flash attention
(its CPU default, the reference path) and once without: the second is llama.cpp's distance
from itself, the yardstick for ours.

    ~/.cache/potluck/llamacpp/venv/bin/python examples/llamacpp_arch_fixtures.py \
        [--out tests/fixtures/arch-agreement.json]

(`examples/bench_vs_llamacpp.sh` builds that venv once.)
"""
import argparse, hashlib, json, os, subprocess, sys, tempfile
import numpy as np
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_model_fixture import log_softmax  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
# What the test rebuilds: architecture, preset, weight type, seed, tied head.
CASES = [
    {"name": "llama-tiny-q8_0", "architecture": "llama", "preset": "tiny", "dtype": "q8_0", "seed": 21, "tied": False},
    {"name": "qwen2-tiny-q8_0", "architecture": "qwen2", "preset": "tiny", "dtype": "q8_0", "seed": 22, "tied": False},
    {"name": "qwen3-tiny-q4k", "architecture": "qwen3", "preset": "tiny", "dtype": "q4k", "seed": 23, "tied": False},
    {"name": "qwen3-tiny-q8_0", "architecture": "qwen3", "preset": "tiny", "dtype": "q8_0", "seed": 23, "tied": False},
    {"name": "llama-tiny-q4k", "architecture": "llama", "preset": "tiny", "dtype": "q4k", "seed": 23, "tied": False},
    {"name": "llama-tiny-q6k", "architecture": "llama", "preset": "tiny", "dtype": "q6k", "seed": 24, "tied": False},
    {"name": "llama-tiny-q5_0", "architecture": "llama", "preset": "tiny", "dtype": "q5_0", "seed": 25, "tied": False},
    {"name": "phi3-tiny-q8_0", "architecture": "phi3", "preset": "tiny", "dtype": "q8_0", "seed": 26, "tied": False},
    {"name": "phi3-tiny-q4k", "architecture": "phi3", "preset": "tiny", "dtype": "q4k", "seed": 27, "tied": False},
    # Mixtures of experts: Mixtral's layout (a llama file with experts) and qwen3moe.
    {"name": "mixtral-tiny-q8_0", "architecture": "llama", "preset": "tiny-moe", "dtype": "q8_0", "seed": 31, "tied": False},
    {"name": "mixtral-tiny-q4k", "architecture": "llama", "preset": "tiny-moe", "dtype": "q4k", "seed": 32, "tied": False},
    {"name": "qwen3moe-tiny-q8_0", "architecture": "qwen3moe", "preset": "tiny-moe", "dtype": "q8_0", "seed": 33, "tied": False},
    # RoPE scaling: linear, and YaRN (factor, the original context) in both RoPE layouts.
    {"name": "llama-tiny-linear-q8_0", "architecture": "llama", "preset": "tiny", "dtype": "q8_0", "seed": 34, "tied": False,
     "rope_scaling": "linear:2"},
    {"name": "qwen2-tiny-yarn-q8_0", "architecture": "qwen2", "preset": "tiny", "dtype": "q8_0", "seed": 35, "tied": False,
     "rope_scaling": "yarn:4:256"},
    {"name": "llama-tiny-yarn-q8_0", "architecture": "llama", "preset": "tiny", "dtype": "q8_0", "seed": 36, "tied": False,
     "rope_scaling": "yarn:8:64"},
    # Phi-3's LongRoPE: the long factors (the context, 256, is past the original 64), the short.
    {"name": "phi3-tiny-longrope-long-q8_0", "architecture": "phi3", "preset": "tiny", "dtype": "q8_0", "seed": 37, "tied": False,
     "rope_scaling": "longrope:1.19:64"},
    {"name": "phi3-tiny-longrope-short-q8_0", "architecture": "phi3", "preset": "tiny", "dtype": "q8_0", "seed": 38, "tied": False,
     "rope_scaling": "longrope:1.19:256"},
]
TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, astronauts landed on the Moon; "
        "their words were heard by millions of people around the world.")
TOP = 5
# The first PROMPT tokens go in one step (prefill), the rest one per step (decode): llama.cpp
# and the engine take other kernels for each. Three: llama.cpp multiplies repacked Q4_K/Q4_0
# weights (its AVX2 `*_8x8` layouts) a row at a time (gemv) for the rows of a step that do not
# fill a group of 4, and in groups of 4 (gemm, another rounding order) otherwise; from 8 rows
# on it takes its tiled K-quant kernel. The engine computes every row the same way whatever
# else shares its step (batch invariance), in the order of llama.cpp's one-row kernels.
PROMPT = 3


def evaluate(path, tokens, flash):
    llm = Llama(model_path=path, n_threads=2, n_ctx=256, n_batch=256, logits_all=True, verbose=False, flash_attn=flash)
    llm.reset()
    llm.eval(tokens[:PROMPT])
    for t in tokens[PROMPT:]:
        llm.eval([t])
    rows = [log_softmax(llm.scores[i]) for i in range(len(tokens))]
    del llm
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests/fixtures/arch-agreement.json"))
    args = ap.parse_args()
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            path = os.path.join(tmp, case["name"] + ".gguf")
            cmd = ["cargo", "run", "-q", "-p", "potluck-engine", "--example", "random_gguf", "--",
                   "--out", path, "--arch", case["architecture"], "--preset", case["preset"],
                   "--dtype", case["dtype"], "--seed", str(case["seed"]), "--threads", "1"]
            if case["tied"]:
                cmd.append("--tied")
            if "rope_scaling" in case:
                cmd += ["--rope-scaling", case["rope_scaling"]]
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            sha256 = hashlib.sha256(open(path, "rb").read()).hexdigest()
            tokenizer = Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
            tokens = tokenizer.tokenize(TEXT.encode(), add_bos=False, special=False)
            del tokenizer
            flash = evaluate(path, tokens, True)
            plain = evaluate(path, tokens, False)
            positions, deltas, flips, excluded = [], [], 0, 0
            for a, b in zip(flash, plain):
                top = np.argsort(-a)[:TOP]
                positions.append([[int(i), float(a[i])] for i in top])
                deltas.append(abs(b[top[0]] - a[top[0]]))
                if a[top[0]] - a[top[1]] >= 0.1:
                    flips += int(np.argmax(b) != top[0])
                else:
                    excluded += 1
            d = np.array(deltas)
            print(f"{case['name']}: {len(tokens)} positions; llama.cpp without flash attention against with it: "
                  f"mean |Δ logprob| {d.mean():.4f}, max {d.max():.4f}, {flips} top-1 flips at margin >= 0.1 "
                  f"({excluded} positions under that margin)", file=sys.stderr)
            cases.append({**case, "sha256": sha256, "tokens": [int(t) for t in tokens], "prompt_tokens": PROMPT,
                          "top_logprobs": positions,
                          "llamacpp_without_flash": {"mean_abs_delta": float(d.mean()), "max_abs_delta": float(d.max()),
                                                     "top1_flips": flips, "positions_under_margin": excluded}})
    fixture = {
        "about": "llama.cpp's teacher-forced log-probabilities (flash attention on) on seeded random-weight GGUFs "
                 "written by engine/examples/random_gguf.rs with the default model's tokenizer; "
                 "made by examples/llamacpp_arch_fixtures.py",
        "llama_cpp": "llama-cpp-python 0.3.36",
        "cases": cases,
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
