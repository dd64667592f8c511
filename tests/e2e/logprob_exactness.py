"""Exactness by log-probabilities: the default cluster must give one machine's answer bit for
bit, and text equality is not enough (f16 activations between stages kept 6 of 11 answers'
text while changing their log-probabilities). Every case of the committed fixture is a greedy
request whose generated tokens, their log-probabilities and their top alternatives' are
compared as exact IEEE-754 values (`float.hex`), not within a tolerance.

usage:
  logprob_exactness.py record BASE_URL FIXTURE   # writes FIXTURE's `expected` from BASE_URL
  logprob_exactness.py check BASE_URL FIXTURE LABEL
  logprob_exactness.py check-killed BASE_URL FIXTURE PID
      streams the fixture's `long` case and SIGKILLs PID (a worker) after KILL_AFTER_CHUNKS
      chunks: the answer, log-probabilities included, must still equal the fixture.

Exits 1 with the first differing token of each differing case.
"""
import json
import os
import signal
import sys
import time
import urllib.request

# After this many streamed chunks the worker is killed: early enough that most of the answer
# (96 tokens) comes after the re-plan and the replay of the tokens so far.
KILL_AFTER_CHUNKS = 16
REQUEST_TIMEOUT_S = 300


def post(base_url, path, body):
    request = urllib.request.Request(base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        return json.load(response)


def hexf(value):
    return None if value is None else float(value).hex()


def chat_entries(content):
    """Chat's `logprobs.content` as [token, logprob, [[alt, logprob], ...]] with exact hex floats."""
    return [[e["token"], hexf(e["logprob"]), [[t["token"], hexf(t["logprob"])] for t in e["top_logprobs"]]]
            for e in content]


def completion_entries(logprobs):
    """Completions' legacy logprobs object in the same shape (top alternatives sorted by token,
    as the object is a map)."""
    tops = logprobs["top_logprobs"] or [None] * len(logprobs["tokens"])
    return [[token, hexf(lp), sorted([k, hexf(v)] for k, v in (top or {}).items())]
            for token, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], tops)]


def run_case(base_url, case):
    body = dict(case["request"], model="x", temperature=0)
    if case["endpoint"] == "chat":
        r = post(base_url, "/v1/chat/completions", body)
        choice = r["choices"][0]
        return {"text": choice["message"]["content"], "entries": chat_entries(choice["logprobs"]["content"])}
    r = post(base_url, "/v1/completions", body)
    choice = r["choices"][0]
    return {"text": choice["text"], "entries": completion_entries(choice["logprobs"])}


def stream_chat_killing(base_url, case, pid):
    """Streams a chat case and kills `pid` after KILL_AFTER_CHUNKS chunks; returns the answer
    gathered from the chunks and the longest pause between two chunks."""
    body = dict(case["request"], model="x", temperature=0, stream=True)
    request = urllib.request.Request(base_url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    text, entries, stamps, killed = [], [], [], False
    with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise SystemExit(f"FAILED: the stream ended in an error: {chunk['error']}")
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            text.append(choice["delta"].get("content") or "")
            if choice.get("logprobs"):
                entries += chat_entries(choice["logprobs"]["content"])
                stamps.append(time.monotonic())
            if len(stamps) == KILL_AFTER_CHUNKS and not killed:
                killed = True
                os.kill(pid, signal.SIGKILL)
                print(f"killed pid {pid} after {len(stamps)} chunks", flush=True)
    if not killed:
        raise SystemExit(f"FAILED: the answer ended before chunk {KILL_AFTER_CHUNKS}; nothing was killed")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"text": "".join(text), "entries": entries}, max(gaps)


def first_difference(expected, actual):
    for i, (e, a) in enumerate(zip(expected["entries"], actual["entries"])):
        if e != a:
            return f"token {i}: expected {e}, got {a}"
    if len(expected["entries"]) != len(actual["entries"]):
        return f"{len(expected['entries'])} tokens expected, {len(actual['entries'])} got"
    if expected["text"] != actual["text"]:
        return f"text {expected['text']!r} != {actual['text']!r}"
    return None


def main():
    mode, base_url, path = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(path) as f:
        fixture = json.load(f)
    cases = fixture["cases"]
    if mode == "record":
        for case in cases:
            case["expected"] = run_case(base_url, case)
        with open(path, "w") as f:
            json.dump(fixture, f, indent=1)
            f.write("\n")
        print(f"recorded {len(cases)} cases into {path}")
        return
    if mode == "check":
        label = sys.argv[4]
        failed = []
        for case in cases:
            difference = first_difference(case["expected"], run_case(base_url, case))
            if difference:
                failed.append(f"{case['name']}: {difference}")
        tokens = sum(len(c["expected"]["entries"]) for c in cases)
        if failed:
            print(f"FAILED on {label}: {len(failed)} of {len(cases)} cases differ from the fixture:", file=sys.stderr)
            print("\n".join(failed), file=sys.stderr)
            sys.exit(1)
        print(f"ok on {label}: {len(cases)} cases, {tokens} tokens, log-probabilities bitwise equal to the fixture")
        return
    if mode == "check-killed":
        case = next(c for c in cases if c["name"] == "long")
        actual, pause = stream_chat_killing(base_url, case, int(sys.argv[4]))
        difference = first_difference(case["expected"], actual)
        if difference:
            print(f"FAILED: a worker killed mid-answer changed it: {difference}", file=sys.stderr)
            sys.exit(1)
        print(f"ok: a worker killed mid-answer, {len(actual['entries'])} tokens bitwise equal; resumed after {pause:.2f} s")
        return
    raise SystemExit(f"unknown mode {mode!r}; see the usage in this file's docstring")


if __name__ == "__main__":
    main()
