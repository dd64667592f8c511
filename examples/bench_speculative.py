#!/usr/bin/env python3
"""Speculative decoding (prompt-lookup drafts, or a draft model with --draft) on and off, same
cluster, same run.

  cargo build --release -p potluck-coordinator -p potluck-worker
  python3 examples/bench_speculative.py [--stages 3] [--rounds 5] [--tokens 160] [--threads 1] [--draft MODEL]
  # over links with a LAN's latency (3 stages on examples/netns_cluster.sh's hosts):
  sudo PLK_DELAY=2ms examples/netns_cluster.sh up
  sudo PLK_DELAY=2ms ip netns exec plk-coord python3 examples/bench_speculative.py --netns plk

Starts a cluster on loopback (the coordinator holds stage 0, workers the others; as
examples/bench_cluster.py) and alternates, round by round, requests with `"speculative":
false` and without it (the default, on), on two tasks: one that repeats its input (rewrite
a piece of code with one change) and free-form chat. Reports single-stream decode tokens/s
(completion tokens after the first / time from the first streamed token to the last), the
ratio on/off per round (median), the acceptance rate (from /metrics), and the aggregate
tokens/s of 16 concurrent chats with it on and off. Greedy, so every pair of answers must be
identical; the script checks it.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cluster import BIN, TOKEN, Proc, decode_rate, get, start_config  # noqa: E402

CODE = '''def summarize(orders):
    totals = {}
    for order in orders:
        customer = order["customer"]
        amount = order["price"] * order["quantity"]
        if customer not in totals:
            totals[customer] = 0
        totals[customer] += amount
    ranked = sorted(totals.items(), key=lambda item: item[1], reverse=True)
    return [name for name, _ in ranked[:10]]
'''
TASKS = {
    "repeat": "Here is a Python function:\n\n" + CODE + "\nRewrite the whole function, changing only its name to `top_customers`.",
    "chat": "Tell me about the history of the bicycle, from the first designs to today.",
}


def chat(base, prompt, n, speculative):
    body = {"model": "x", "messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    if not speculative:
        body["speculative"] = False
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    first = last = None
    text, tokens = [], 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    now = time.monotonic()
                    first = first or now
                    last = now
                    text.append(content)
    rate = (tokens - 1) / (last - first) if first and last > first else 0.0
    return "".join(text), tokens, rate


def drafts(base):
    metrics = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    values = {}
    for line in metrics.splitlines():
        for name in ("potluck_draft_tokens_proposed_total", "potluck_draft_tokens_accepted_total", "potluck_draft_steps_total"):
            if line.startswith(name + " "):
                values[name] = int(float(line.split()[1]))
    return values


def concurrent(base, n, speculative, clients=16):
    results = []

    def one(i):
        _, tokens, _ = chat(base, f"Tell me a fact about the number {i}, then explain why it matters.", n, speculative)
        results.append(tokens)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(results) / (time.monotonic() - started)


def start_netns(args, work):
    """3 stages on the hosts of examples/netns_cluster.sh (run this script inside the
    coordinator's namespace): the coordinator here (stage 0, HTTP on its loopback), workers
    on w1 and w2, every hop across the bridge with its delay."""
    prefix, subnet = args.netns, os.environ.get("PLK_SUBNET", "10.77.0")
    common = ["--threads", str(args.threads)]
    cmd = [os.path.join(BIN, "coordinator"), "serve", "--listen", "127.0.0.1:0", "--model", args.model,
           "--cluster-listen", f"{subnet}.1:0", "--token", TOKEN, "--workers", "2", "--no-mdns",
           "--planner", "proportional", "--memory-limit", "4GiB", "--activation-dtype", args.dtype] + common
    if args.draft:
        cmd += ["--draft", args.draft]
    procs = [Proc("coordinator", cmd, {"POTLUCK_CONFIG_DIR": os.path.join(work, "cfg")})]
    base = "http://" + procs[0].wait_line(r" on http://(\S+)").group(1)
    cluster = procs[0].wait_line(r"cluster endpoint on (\S+)").group(1).replace("0.0.0.0", f"{subnet}.1")
    for i in (1, 2):
        procs.append(Proc(f"w{i}", ["ip", "netns", "exec", f"{prefix}-w{i}", os.path.join(BIN, "worker"), "join",
                                    "--coordinator", cluster, "--token", TOKEN, "--listen", f"{subnet}.{i + 1}:0",
                                    "--memory-limit", "4GiB", "--identity", os.path.join(work, f"w{i}.key"),
                                    "--cache-dir", os.path.join(work, f"cache{i}")] + common))
    deadline = time.time() + 300
    while len(get(base + "/health")["stages"]) != 3 or any(
            s["node_id"] == "coordinator" for s in get(base + "/health")["stages"][1:]):
        if time.time() > deadline:
            sys.exit(f"3 stages never became active: {get(base + '/health')}")
        time.sleep(0.2)
    decode_rate(base, "Warm up", 8)
    return base, procs, [], get(base + "/health")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="f32")
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/potluck/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--draft", metavar="MODEL",
                    help="drafts from this model (`coordinator serve --draft`) instead of prompt lookup")
    ap.add_argument("--netns", metavar="PREFIX",
                    help="run on examples/netns_cluster.sh's hosts (3 stages); run this script in PREFIX-coord")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="potluck-bench-spec-")
    if args.netns:
        base, procs, _, health = start_netns(args, work)
        where = f"network namespaces {args.netns}-coord/-w1/-w2, PLK_DELAY={os.environ.get('PLK_DELAY', '?')} per direction"
    else:
        base, procs, _, health = start_config(args.stages, args, work)
        where = "loopback"
    try:
        print(f"{len(health['stages'])} stages: {[s['layers'] for s in health['stages']]}, {args.threads} thread(s) each, {where}")
        rates = {(task, spec): [] for task in TASKS for spec in (False, True)}
        ratios = {task: [] for task in TASKS}
        accept = {}
        for r in range(args.rounds):
            for task, prompt in TASKS.items():
                order = (False, True) if r % 2 == 0 else (True, False)
                answers = {}
                for spec in order:
                    before = drafts(base)
                    text, tokens, rate = chat(base, prompt, args.tokens, spec)
                    after = drafts(base)
                    answers[spec] = text
                    rates[(task, spec)].append(rate)
                    if spec:
                        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                        a = accept.setdefault(task, [0, 0, 0, 0])
                        a[0] += d.get("potluck_draft_tokens_proposed_total", 0)
                        a[1] += d.get("potluck_draft_tokens_accepted_total", 0)
                        a[2] += d.get("potluck_draft_steps_total", 0)
                        a[3] += tokens
                if answers[False] != answers[True]:
                    sys.exit(f"{task}: the answers differ with speculation on and off:\n{answers[False]!r}\n{answers[True]!r}")
                ratios[task].append(rates[(task, True)][-1] / rates[(task, False)][-1])
        print("| task | off tok/s | on tok/s | on/off (median of rounds) | drafted tokens accepted | tokens per step |")
        print("|---|---:|---:|---:|---:|---:|")
        for task in TASKS:
            proposed, accepted, steps, tokens = accept.get(task, [0, 0, 0, 0])
            rate = f"{accepted}/{proposed} ({100 * accepted / proposed:.0f}%)" if proposed else "none proposed"
            per_step = tokens / max(1, tokens - accepted)
            print(f"| {task} | {statistics.median(rates[(task, False)]):.1f} | {statistics.median(rates[(task, True)]):.1f} | "
                  f"{statistics.median(ratios[task]):.2f}x | {rate} | {per_step:.2f} |")
        off = concurrent(base, 64, False)
        on = concurrent(base, 64, True)
        off2 = concurrent(base, 64, False)
        on2 = concurrent(base, 64, True)
        print(f"16 concurrent chats, aggregate tok/s: off {statistics.mean([off, off2]):.1f}, on {statistics.mean([on, on2]):.1f} "
              f"({statistics.mean([on, on2]) / statistics.mean([off, off2]):.2f}x; two runs each, interleaved)")
    finally:
        for p in procs:
            p.stop()


if __name__ == "__main__":
    main()
