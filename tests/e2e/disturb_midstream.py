"""The cluster changes in the middle of a streamed greedy completion, and the stream still
finishes with exactly the tokens of an undisturbed run.

usage: disturb_midstream.py BASE_URL ACTION [TOKENS]

ACTION is `kill:PID` (SIGKILL that worker: the cluster re-plans over the nodes left and the
request replays its tokens so far) or `notify` (print "disturb now" and keep streaming: the
test then changes the cluster itself, e.g. starts another worker). The disturbance comes
after 20 streamed chunks. Prints the longest pause between two streamed chunks (the time to
resume).
"""
import os
import signal
import sys
import time

import openai

base_url, action = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 160
client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=300)
args = dict(model="x", prompt="The capital of France is", max_tokens=n, temperature=0,
            extra_body={"ignore_eos": True})

undisturbed = client.completions.create(**args).choices[0].text
chunks, stamps, disturbed = [], [], False
for chunk in client.completions.create(stream=True, **args):
    if not chunk.choices:
        continue
    chunks.append(chunk.choices[0].text)
    stamps.append(time.monotonic())
    if len(chunks) == 20 and not disturbed:
        disturbed = True
        if action.startswith("kill:"):
            pid = int(action.split(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            print(f"killed pid {pid} after {len(chunks)} chunks", flush=True)
        else:
            print(f"disturb now (after {len(chunks)} chunks)", flush=True)
text = "".join(chunks)
if text != undisturbed:
    print("FAILED: the disturbed stream differs", file=sys.stderr)
    print("undisturbed:", repr(undisturbed), file=sys.stderr)
    print("disturbed:  ", repr(text), file=sys.stderr)
    sys.exit(1)
gaps = [b - a for a, b in zip(stamps, stamps[1:])]
print(f"ok: {len(chunks)} chunks, identical to the undisturbed run; resumed after {max(gaps):.2f} s")
