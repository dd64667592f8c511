"""Checks a running cluster through the official openai client: every reference prompt's
greedy continuation (llama.cpp's, which the single-machine engine reproduces bit for bit)
comes back token for token, streamed and not.

usage: cluster_client.py BASE_URL REFERENCE_JSON
"""
import json
import sys

import openai

base_url, reference_path = sys.argv[1], sys.argv[2]
reference = json.load(open(reference_path))
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print("FAILED:", what, file=sys.stderr)
        sys.exit(1)
    checks += 1
    print("ok:", what)


for ref in reference["greedy"]:
    n = len(ref["generated_ids"])
    # The prompt as token ids: the rendered chat prompt's special tokens stay special.
    common = dict(model="x", prompt=ref["prompt_ids"], max_tokens=n, temperature=0,
                  extra_body={"ignore_eos": True})
    c = client.completions.create(**common)
    check(c.choices[0].text == ref["generated_text"],
          f"{ref['name']}: greedy completion equals the single-machine run ({n} tokens): {c.choices[0].text!r}")
    check(c.usage.completion_tokens == n, f"{ref['name']}: {n} completion tokens")
    parts = [ch.choices[0].text for ch in client.completions.create(stream=True, **common) if ch.choices]
    check("".join(parts) == ref["generated_text"], f"{ref['name']}: streamed completion equals it too")

chat = reference["chat_template_render"]
r = client.chat.completions.create(model="x", messages=chat["messages"], max_tokens=16, temperature=0)
check(bool(r.choices[0].message.content), f"chat answer: {r.choices[0].message.content!r}")
print(f"all {checks} checks passed")
