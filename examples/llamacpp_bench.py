"""llama.cpp's single-machine prefill and decode tokens/s on a GGUF, through llama-cpp-python.

Measures exactly what `engine-bench` measures for potluck: one prefill of N prompt tokens
(the same token ids), then M greedy decode steps of one token each. Run by
examples/bench_vs_llamacpp.sh, which builds llama-cpp-python once into a cache folder.
"""
import argparse, json, statistics, time

import numpy as np
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--prompt-tokens", type=int, default=128)
ap.add_argument("--gen-tokens", type=int, default=64)
ap.add_argument("--reps", type=int, default=3)
args = ap.parse_args()

llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
            n_ctx=args.prompt_tokens + args.gen_tokens + 16, n_batch=512, verbose=False)
vocab = llm.n_vocab()
prompt = [(i * 7919 + 13) % vocab for i in range(args.prompt_tokens)]
prefill, decode = [], []
for rep in range(args.reps + 1):
    llm.reset()
    llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
    t0 = time.perf_counter()
    llm.eval(prompt)
    p_s = time.perf_counter() - t0
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t1 = time.perf_counter()
    for _ in range(args.gen_tokens):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    d_s = time.perf_counter() - t1
    if rep == 0:
        continue
    p, d = args.prompt_tokens / p_s, args.gen_tokens / d_s
    print(json.dumps({"rep": rep, "prefill_tok_s": round(p, 1), "decode_tok_s": round(d, 1)}))
    prefill.append(p); decode.append(d)
print(json.dumps({"engine": "llama.cpp", "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                  "gen_tokens": args.gen_tokens, "prefill_tok_s": round(statistics.median(prefill), 1),
                  "decode_tok_s": round(statistics.median(decode), 1)}))
