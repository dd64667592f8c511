"""Dump llama.cpp's intermediate tensors (its eval callback) for a prompt, to compare with
potluck's per-layer hidden states bit for bit (`engine/examples/dump_hidden.rs`).

    ~/.cache/potluck/llamacpp/venv/bin/python examples/llamacpp_dump_layers.py   # writes /tmp/bx/llamacpp.npz
    cargo run --release -p potluck-engine --example dump_hidden -- MODEL /tmp/bx 504,3575,282,4649,314

Tensor layout read through ctypes follows ggml.h at llama.cpp 0c1e570 (name at byte 256, data
pointer at 248, ne at 16, nb at 48). Only contiguous 2-D f32 tensors are kept.
"""
import os
os.makedirs("/tmp/bx", exist_ok=True)
import ctypes, numpy as np, sys, json
import llama_cpp
from llama_cpp import Llama
M = os.environ.get("POTLUCK_DUMP_MODEL", os.path.expanduser("~/.cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
want = set(sys.argv[1].split(",")) if len(sys.argv) > 1 else None
store = {}
CB = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)
def cb(t, ask, ud):
    name = ctypes.string_at(t + 256).decode()
    if ask:
        return True
    typ = ctypes.c_int32.from_address(t).value
    ne = [ctypes.c_int64.from_address(t + 16 + 8 * i).value for i in range(4)]
    nb = [ctypes.c_uint64.from_address(t + 48 + 8 * i).value for i in range(4)]
    data = ctypes.c_void_p.from_address(t + 248).value
    if typ == 0 and data and nb[0] == 4 and nb[1] == 4 * ne[0] and ne[2] == 1 and ne[3] == 1:
        n = ne[0] * ne[1]
        arr = np.frombuffer(ctypes.string_at(data, n * 4), dtype=np.float32).reshape(ne[1], ne[0]).copy()
        store.setdefault(name, []).append(arr)
    return True
cbf = CB(cb)
import llama_cpp.llama_cpp as L
orig = L.llama_context_default_params
def patched():
    p = orig(); p.cb_eval = cbf; p.cb_eval_user_data = None; return p
L.llama_context_default_params = patched
llm = Llama(model_path=M, n_threads=1, n_threads_batch=1, n_ctx=256, verbose=False, flash_attn=True)
store.clear()
toks = [int(t) for t in os.environ.get("POTLUCK_DUMP_TOKENS", "504,3575,282,4649,314").split(",")]
llm.eval(toks)
np.savez("/tmp/bx/llamacpp.npz", **{f"{k}#{i}": a for k, v in store.items() for i, a in enumerate(v)})
print(sorted(store.keys())[:200], file=sys.stderr)
