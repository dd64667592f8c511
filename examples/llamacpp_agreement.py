"""How far llama.cpp is from its own reference: teacher-forced log-probabilities of
tests/fixtures/smollm2-q4_1-llamacpp.json recomputed by llama.cpp itself (llama-cpp-python
0.3.36, same llama.cpp commit) with flash attention on (the reference's path) and off.

This is the yardstick for engine/tests/reference_model.rs: llama.cpp's flash path keeps its
attention accumulator in f16, so any implementation that is not bit-identical to it (llama.cpp's
own non-flash path included) lands about this far away.

    ~/.cache/potluck/llamacpp/venv/bin/python examples/llamacpp_agreement.py [MODEL]
"""
import json, os, sys
import numpy as np
from llama_cpp import Llama

here = os.path.dirname(os.path.abspath(__file__))
ref = json.load(open(os.path.join(here, "../tests/fixtures/smollm2-q4_1-llamacpp.json")))
model = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf")
for flash in (True, False):
    llm = Llama(model_path=model, n_threads=2, n_ctx=256, logits_all=True, verbose=False, flash_attn=flash)
    deltas, flips = [], 0
    for case in ref["greedy"]:
        n_prompt = len(case["prompt_ids"])
        llm.reset()
        llm.eval(case["prompt_ids"])  # the prompt in one step, then one token per step
        for t in case["generated_ids"][:-1]:
            llm.eval([t])
        for i, pos in enumerate(case["all_positions_top5"]):
            row = np.array(llm.scores[n_prompt - 1 + i], dtype=np.float64)
            lse = np.log(np.exp(row - row.max()).sum()) + row.max()
            top = pos["top_logprobs"]
            deltas.append(abs(row[top[0]["id"]] - lse - top[0]["logprob"]))
            if top[0]["logprob"] - top[1]["logprob"] >= 0.1 and int(np.argmax(row)) != top[0]["id"]:
                flips += 1
    d = np.array(deltas)
    print(f"llama.cpp flash_attn={flash}: mean |Δ logprob| {d.mean():.4f}, max {d.max():.4f}, "
          f"{(d > 0.05).sum()} of {len(d)} over 0.05, {flips} top-1 flips at margin >= 0.1")
