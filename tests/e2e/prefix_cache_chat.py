"""A 10-turn chat against a real coordinator, each turn resending the history as clients do:
prefix caching must change nothing in the answers, and the last turn's prompt must come from
the kept cache. Prints each run's time to first token of the last turn.

Usage: prefix_cache_chat.py BASE_URL [WORKER_PID_TO_KILL]
  - the chat with the cache (the default), then with `cache_prompt: false`: same answers;
  - with a pid: the chat again, that worker killed after turn 5 (with cached prefixes in
    place); once the cluster has re-planned, turns 6-10 give the same answers again.
Exits non-zero on the first failed check.
"""
import json
import os
import signal
import sys
import time
import urllib.request

import openai

base_url = sys.argv[1]
kill_pid = int(sys.argv[2]) if len(sys.argv) > 2 else None
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
QUESTIONS = [
    "Hi! I am planning a vegetable garden. What should I plant first?",
    "How much sun do tomatoes need?",
    "And how often should I water them?",
    "What about carrots?",
    "Which pests should I watch out for?",
    "How do I keep slugs away without chemicals?",
    "Can I grow herbs next to the tomatoes?",
    "Which herbs are easiest for a beginner?",
    "When should I harvest basil?",
    "Thanks! Can you summarise the plan in two sentences?",
]


def fail(what):
    print("FAILED:", what, file=sys.stderr)
    sys.exit(1)


def turn(history, cache):
    """One streamed turn: (answer, seconds to the first content, cached prompt tokens, prompt tokens)."""
    started = time.monotonic()
    first = None
    parts = []
    usage = None
    stream = client.chat.completions.create(
        model="x", messages=history, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"cache_prompt": cache})
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.monotonic() - started
            parts.append(chunk.choices[0].delta.content)
    cached = (usage.prompt_tokens_details.cached_tokens or 0) if usage.prompt_tokens_details else 0
    return "".join(parts), first, cached, usage.prompt_tokens


def chat(cache, turns=range(10), history=None, on_turn=None):
    history = history if history is not None else []
    answers = []
    for i in turns:
        history.append({"role": "user", "content": QUESTIONS[i]})
        answer, ttft, cached, prompt = turn(history, cache)
        history.append({"role": "assistant", "content": answer})
        answers.append((answer, ttft, cached, prompt))
        if on_turn:
            on_turn(i)
    return answers, history


def stages(url):
    """Stages of the current plan, and whether every live node is ready."""
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        health = json.loads(r.read())
    live = [n for n in health["nodes"] if not n["state"].startswith("gone")]
    return len(health["stages"]), bool(live) and all(n["state"] == "ready" for n in live)


with_cache, _ = chat(True)
without, _ = chat(False)
for i, (a, b) in enumerate(zip(with_cache, without)):
    if a[0] != b[0]:
        fail(f"turn {i + 1}: the answer with the cache differs: {a[0]!r} vs {b[0]!r}")
    if b[2] != 0:
        fail(f"turn {i + 1}: cache_prompt false still reused {b[2]} tokens")
last, last_plain = with_cache[-1], without[-1]
if last[2] < last[3] // 2:
    fail(f"the last turn reused only {last[2]} of its {last[3]} prompt tokens")
print(f"ok: 10 turns, the same answers with and without the cache; the last turn's prompt: "
      f"{last[3]} tokens, {last[2]} from the kept cache")
print(f"time to first token, last turn: {last[1] * 1000:.0f} ms with the cache, {last_plain[1] * 1000:.0f} ms without")

if kill_pid:
    def maybe_kill(i):
        if i == 4:
            before, _ = stages(base_url)
            os.kill(kill_pid, signal.SIGKILL)
            deadline = time.monotonic() + 120
            while True:
                try:
                    n, ready = stages(base_url)
                    if n < before and ready:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    fail("the cluster did not re-plan within 120 s")
                time.sleep(0.2)
    again, _ = chat(True, on_turn=maybe_kill)
    for i, (a, b) in enumerate(zip(again, with_cache)):
        if a[0] != b[0]:
            fail(f"turn {i + 1} after the kill: {a[0]!r} vs {b[0]!r}")
    print(f"ok: a worker killed after turn 5 with cached prefixes in place; after the re-plan the "
          f"answers are the same (turn 10 reused {again[-1][2]} of {again[-1][3]} prompt tokens)")
