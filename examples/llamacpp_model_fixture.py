"""Records what llama.cpp does with a real GGUF, for the engine's agreement tests: token ids of
reference strings, and greedy continuations of prompts with the top-5 log-probabilities at
every generated position (the prompt in one step, then one token per step), flash attention
on (llama.cpp's CPU default); plus the same positions without flash attention, llama.cpp's
distance from itself (the yardstick for ours).

    ~/.cache/potluck/llamacpp/venv/bin/python examples/llamacpp_model_fixture.py \
        --model gemma-3-270m-q4_k_m.gguf --out tests/fixtures/gemma3-270m-q4_k_m-llamacpp.json

(`examples/bench_vs_llamacpp.sh` builds that venv once: llama-cpp-python 0.3.36.)
"""
import argparse, hashlib, json, os, sys
import numpy as np
from llama_cpp import Llama

# Strings whose ids are compared: spaces, digits, punctuation, Unicode, code, special tokens.
TOKENIZER_STRINGS = [
    "Hello world",
    " Hello  world ",
    "The capital of France is Paris.",
    "1234567890 3.14159 -42",
    "naïve café, Ünïcödé — “quotes” and emoji 🦀🚀",
    "def f(x):\n    return x * 2\n\n\tindented\r\n",
    "日本語のテキストと中文文本",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "   leading spaces and trailing   ",
    "",
]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n",
]
GENERATED = 24
TOP = 5


def log_softmax(row):
    row = np.asarray(row, dtype=np.float64)
    m = row.max()
    return row - (np.log(np.exp(row - m).sum()) + m)


def run(llm, prompt_ids, forced=None, stepwise=False, raw=None):
    """Greedy (or teacher-forced on `forced`) continuation: per generated position, the
    log-probabilities after the prompt and each generated token. The prompt goes in one step,
    or one token per step when `stepwise`; `raw` collects the f32 logits rows."""
    llm.reset()
    if stepwise:
        for t in prompt_ids:
            llm.eval([t])
    else:
        llm.eval(prompt_ids)
    rows, tokens = [], []
    for i in range(GENERATED):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        if raw is not None:
            raw.append(logits)
        row = log_softmax(logits)
        rows.append(row)
        t = int(np.argmax(row)) if forced is None else forced[i]
        tokens.append(t)
        if i + 1 < GENERATED:
            llm.eval([t])
    return tokens, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sha256 = hashlib.sha256(open(args.model, "rb").read()).hexdigest()
    flash = Llama(model_path=args.model, n_threads=2, n_ctx=512, n_batch=512, logits_all=True, verbose=False, flash_attn=True)
    plain = Llama(model_path=args.model, n_threads=2, n_ctx=512, n_batch=512, logits_all=True, verbose=False, flash_attn=False)
    tokenizer = [{"text": s, "ids": flash.tokenize(s.encode(), add_bos=True, special=True)} for s in TOKENIZER_STRINGS]
    tokenizer += [{"text": s, "ids": flash.tokenize(s.encode(), add_bos=False, special=False), "plain": True} for s in TOKENIZER_STRINGS]
    greedy, deltas, flips = [], [], 0
    for prompt in PROMPTS:
        ids = flash.tokenize(prompt.encode(), add_bos=True, special=False)
        tokens, rows = run(flash, ids)
        _, plain_rows = run(plain, ids, forced=tokens)
        positions = []
        for a, b in zip(rows, plain_rows):
            top = np.argsort(-a)[:TOP]
            positions.append([[int(i), float(a[i])] for i in top])
            deltas.append(abs(b[top[0]] - a[top[0]]))
            if a[top[0]] - a[top[1]] >= 0.1:
                flips += int(np.argmax(b) != top[0])
        greedy.append({"prompt": prompt, "prompt_ids": ids, "generated_ids": tokens,
                       "text": flash.detokenize(tokens).decode("utf-8", "replace"), "top_logprobs": positions})
        print(f"{prompt!r} -> {greedy[-1]['text']!r}", file=sys.stderr)
    # Every step one row: llama.cpp's one-row kernels throughout (repacked Q4_K weights go
    # through its gemv, not its 4-row gemm), whose order the engine follows: the logits of
    # llama.cpp's top 5 at every position, as exact f32 values (hex).
    stepwise = []
    for prompt in PROMPTS:
        ids = flash.tokenize(prompt.encode(), add_bos=True, special=False)
        raw = []
        tokens, _ = run(flash, ids, stepwise=True, raw=raw)
        stepwise.append({"prompt": prompt, "prompt_ids": ids, "generated_ids": tokens,
                         "top_logits": [[[int(i), float(r[i]).hex()] for i in np.argsort(-r)[:TOP]] for r in raw]})
    d = np.array(deltas)
    print(f"llama.cpp without flash attention against with it: mean |Δ logprob| {d.mean():.4f}, max {d.max():.4f}, "
          f"{flips} top-1 flips at margin >= 0.1 over {len(d)} positions", file=sys.stderr)
    fixture = {
        "about": "llama.cpp's token ids and greedy continuations (top-5 log-probabilities per generated position, "
                 "prompt in one step then one token per step, flash attention on); made by examples/llamacpp_model_fixture.py",
        "llama_cpp": "llama-cpp-python 0.3.36",
        "model": os.path.basename(args.model),
        "model_sha256": sha256,
        "tokenizer": tokenizer,
        "greedy": greedy,
        "greedy_one_token_per_step": stepwise,
        "llamacpp_without_flash": {"mean_abs_delta": float(d.mean()), "max_abs_delta": float(d.max()), "top1_flips": flips,
                                   "positions": len(d)},
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
