#!/usr/bin/env python3
"""Drives headless Chromium over the DevTools protocol to check the coordinator's live dashboard.

Usage:
  dashboard_browser.py --url http://127.0.0.1:PORT --expect-stages N \
      --expect-layers "0-10,10-20,20-30" --screenshot OUT.png \
      [--stream-prompt "Count from 1 to 50"] [--stream-max-tokens 120] [--timeout 60] \
      [--viewport 1400x1000] [--full-page] [--chromium /usr/bin/chromium]

Python 3 standard library only. Chromium runs with --remote-debugging-pipe: CDP messages are
JSON terminated by a NUL byte, Chromium reads commands from its fd 3 and writes replies and
events to its fd 4.

What it checks (see coordinator/src/dashboard.html for the page's test hooks):
  1. The page loads, and the node cards carrying `data-stage` (stage cards, ordered by its
     value) number --expect-stages and their `data-layers` equal --expect-layers, in order.
  2. With --stream-prompt: while a streaming POST /v1/completions runs, `#tps` shows at least
     two distinct numbers, one of them > 0; the stream ends with `data: [DONE]`. The screenshot
     is taken while it streams (after the first nonzero tokens/s).
  3. No uncaught JavaScript exception and no console.error on the page.
Prints progress lines, then a one-line JSON summary as the last line of stdout; exit 0.
On failure: the reason on stderr, a screenshot of the failing state if possible, exit 1.
Everything runs under --timeout (plus a short grace for cleanup); Chromium is killed and its
profile directory removed on every exit path.
"""
import argparse
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
    "--remote-debugging-pipe",
]


LAUNCHER = (
    "import os, sys\n"
    "a, b = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.dup2(a, 3)\n"
    "os.dup2(b, 4)\n"
    "os.close(a)\n"
    "os.close(b)\n"
    "os.execv(sys.argv[3], sys.argv[3:])\n"
)


class Failure(Exception):
    pass


def log(*a):
    print("dashboard:", *a, flush=True)


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return self.end - time.monotonic()

    def cap(self, seconds):
        """A wait of at most `seconds`, never past the overall deadline."""
        return max(0.0, min(seconds, self.left()))

    def check(self, what):
        if self.left() <= 0:
            raise Failure(f"overall timeout while {what}")


class Chromium:
    """One Chromium process and its CDP pipe."""

    def __init__(self, binary, deadline):
        if not (os.path.isfile(binary) and os.access(binary, os.X_OK)):
            raise Failure(f"Chromium not found at {binary} (apt-get install -y chromium, or --chromium PATH)")
        self.deadline = deadline
        self.tmp = tempfile.mkdtemp(prefix="potluck-dashboard-")
        self.proc = None
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.replies = {}
        self.next_id = 0
        self.closed = False
        self.exceptions = []      # uncaught JS exceptions (fail the test)
        self.console_errors = []  # console.error / console.assert (fail the test)
        self.log_errors = []      # browser log entries at level error (reported only)
        self.crashed = None
        profile = os.path.join(self.tmp, "profile")
        os.mkdir(profile)
        self.stderr_path = os.path.join(self.tmp, "chromium.log")
        cmd_r, cmd_w = os.pipe()    # we write commands, Chromium reads them on fd 3
        resp_r, resp_w = os.pipe()  # Chromium writes on fd 4, we read
        # Move the child's ends above the low fds so the shell's redirections cannot clobber them.
        child_in = _fd_above(cmd_r, 10)
        child_out = _fd_above(resp_w, 10)
        os.close(cmd_r)
        os.close(resp_w)
        self.cmd_w, self.resp_r = cmd_w, resp_r
        argv = CHROMIUM_FLAGS + [f"--user-data-dir={profile}", "about:blank"]
        # A tiny exec-launcher puts the pipe ends on fds 3 and 4 and becomes Chromium: no
        # preexec_fn (whose dup2 could clobber subprocess's own error pipe), and unlike dash's
        # redirections it takes fds above 9.
        try:
            with open(self.stderr_path, "wb") as errf:
                self.proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", LAUNCHER, str(child_in), str(child_out), binary] + argv,
                    stdin=subprocess.DEVNULL, stdout=errf, stderr=errf,
                    pass_fds=(child_in, child_out), start_new_session=True)
        finally:
            os.close(child_in)
            os.close(child_out)
        self.reader = threading.Thread(target=self._read_loop, name="cdp-reader", daemon=True)
        self.reader.start()

    # -- transport --
    def _read_loop(self):
        buf = b""
        try:
            while True:
                chunk = os.read(self.resp_r, 1 << 16)
                if not chunk:
                    break
                buf += chunk
                while b"\0" in buf:
                    raw, buf = buf.split(b"\0", 1)
                    if raw:
                        self._dispatch(json.loads(raw))
        except Exception as e:  # noqa: BLE001 - report any reader failure to the waiters
            with self.cond:
                self.crashed = self.crashed or f"CDP reader failed: {e!r}"
        finally:
            with self.cond:
                self.closed = True
                self.cond.notify_all()

    def _dispatch(self, msg):
        if "id" in msg:
            with self.cond:
                self.replies[msg["id"]] = msg
                self.cond.notify_all()
            return
        method, params = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = params.get("exceptionDetails", {})
            exc = d.get("exception", {})
            text = exc.get("description") or d.get("text") or "exception"
            where = f"{d.get('url', '')}:{d.get('lineNumber', 0) + 1}:{d.get('columnNumber', 0) + 1}"
            self.exceptions.append(f"{text} at {where}")
            log("JS EXCEPTION:", text.splitlines()[0], "at", where)
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            parts = []
            for a in params.get("args", []):
                parts.append(str(a.get("value", a.get("description", a.get("type")))))
            text = " ".join(parts)
            self.console_errors.append(text)
            log("console.error:", text)
        elif method == "Log.entryAdded":
            e = params.get("entry", {})
            if e.get("level") == "error":
                text = f"{e.get('source')}: {e.get('text')} {e.get('url', '')}".strip()
                self.log_errors.append(text)
        elif method in ("Inspector.targetCrashed",):
            with self.cond:
                self.crashed = "the page's renderer crashed"
                self.cond.notify_all()
        elif method == "Target.detachedFromTarget":
            with self.cond:
                self.crashed = self.crashed or "detached from the page target"
                self.cond.notify_all()

    def send(self, method, params=None, session=None, timeout=15.0):
        with self.cond:
            self.next_id += 1
            mid = self.next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        data = json.dumps(msg).encode() + b"\0"
        try:
            while data:
                n = os.write(self.cmd_w, data)
                data = data[n:]
        except OSError as e:
            raise Failure(f"cannot write to Chromium ({method}): {e}; {self.stderr_tail()}")
        # Bounded by the overall deadline, but with a short floor, so a call made just before
        # it expires reports its own outcome rather than a misleading "no reply".
        end = time.monotonic() + min(timeout, max(self.deadline.left(), 2.0))
        with self.cond:
            while mid not in self.replies:
                if self.closed:
                    raise Failure(f"Chromium closed the DevTools pipe during {method}; {self.stderr_tail()}")
                left = end - time.monotonic()
                if left <= 0:
                    raise Failure(f"no reply to {method} (waited {timeout:.0f}s or until the overall timeout)")
                self.cond.wait(min(left, 0.5))
            reply = self.replies.pop(mid)
        if "error" in reply:
            raise Failure(f"{method} failed: {reply['error'].get('message')} {reply['error'].get('data', '')}")
        return reply.get("result", {})

    def stderr_tail(self, lines=15):
        try:
            with open(self.stderr_path, "rb") as f:
                tail = f.read().decode(errors="replace").strip().splitlines()[-lines:]
            return "Chromium log tail:\n  " + "\n  ".join(tail) if tail else "Chromium wrote nothing"
        except OSError:
            return "no Chromium log"

    def close(self):
        """Graceful Browser.close, then SIGKILL the whole process group; remove the profile."""
        if self.proc is not None and self.proc.poll() is None:
            if not self.closed:
                try:
                    msg = json.dumps({"id": 10 ** 9, "method": "Browser.close", "params": {}}).encode() + b"\0"
                    os.write(self.cmd_w, msg)
                except OSError:
                    pass
            try:
                self.proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        elif self.proc is not None:
            # Chromium itself exited; helpers in its group may linger.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for fd in (self.cmd_w, self.resp_r):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


def _fd_above(fd, lowest):
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)


class Page:
    def __init__(self, browser, session):
        self.b, self.session = browser, session

    def send(self, method, params=None, timeout=15.0):
        if self.b.crashed:
            raise Failure(self.b.crashed)
        return self.b.send(method, params, session=self.session, timeout=timeout)

    def eval(self, expr, timeout=10.0):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True, "awaitPromise": True}, timeout)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise Failure(f"evaluating {expr[:60]!r} threw: {d.get('exception', {}).get('description') or d.get('text')}")
        return r.get("result", {}).get("value")

    def screenshot(self, path, full_page=False, timeout=15.0):
        params = {"format": "png"}
        if full_page:
            m = self.send("Page.getLayoutMetrics", timeout=timeout)
            size = m.get("cssContentSize") or m.get("contentSize")
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        data = self.send("Page.captureScreenshot", params, timeout=timeout)["data"]
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path


CARDS_JS = """(() => Array.from(document.querySelectorAll('[data-node]')).map(e => ({
  node: e.getAttribute('data-node'),
  layers: e.getAttribute('data-layers'),
  stage: e.hasAttribute('data-stage') ? Number(e.getAttribute('data-stage')) : null,
  state: e.getAttribute('data-state'),
})))()"""

TPS_JS = """(() => { const t = document.getElementById('tps'), q = document.getElementById('inflight');
  return [t ? t.textContent.trim() : null, q ? q.textContent.trim() : null]; })()"""


def parse_layers(spec):
    out = []
    for part in spec.split(","):
        part = part.strip().replace("\u2013", "-")
        if not part:
            continue
        a, _, b = part.partition("-")
        out.append(f"{int(a)}-{int(b)}")
    return out


def to_number(text):
    try:
        return float(text.replace(",", ""))
    except (AttributeError, ValueError):
        return None


class Streamer(threading.Thread):
    """One streaming POST /v1/completions; reads SSE lines until `data: [DONE]`."""

    def __init__(self, url, prompt, max_tokens, timeout):
        super().__init__(name="stream", daemon=True)
        self.url, self.prompt, self.max_tokens, self.timeout = url, prompt, max_tokens, timeout
        self.chunks = 0
        self.text = []
        self.done = False
        self.error = None
        self.first_chunk_at = None
        self.finished = threading.Event()

    def run(self):
        body = json.dumps({"model": "x", "prompt": self.prompt, "max_tokens": self.max_tokens,
                           "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(self.url.rstrip("/") + "/v1/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        try:
            with urllib.request.urlopen(req, timeout=max(1.0, self.timeout)) as r:
                for raw in r:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        self.done = True
                        break
                    self.chunks += 1
                    if self.first_chunk_at is None:
                        self.first_chunk_at = time.monotonic()
                    try:
                        obj = json.loads(payload)
                        if "error" in obj:
                            self.error = f"error in stream: {obj['error']}"
                            break
                        for ch in obj.get("choices", []):
                            self.text.append(ch.get("text") or "")
                    except (ValueError, AttributeError):
                        pass
        except urllib.error.HTTPError as e:
            self.error = f"HTTP {e.code}: {e.read(500).decode('utf-8', 'replace')}"
        except Exception as e:  # noqa: BLE001 - any failure is reported by the main thread
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.finished.set()


def run(args, browser, deadline, summary, state):
    browser.send("Browser.getVersion", timeout=20)
    target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    page = Page(browser, session)
    state["page"] = page
    page.send("Runtime.enable")
    page.send("Page.enable")
    page.send("Log.enable")
    w, _, h = args.viewport.partition("x")
    page.send("Emulation.setDeviceMetricsOverride",
              {"width": int(w), "height": int(h), "deviceScaleFactor": 1, "mobile": False})

    url = args.url.rstrip("/") + "/"
    nav = page.send("Page.navigate", {"url": url}, timeout=20)
    if nav.get("errorText"):
        raise Failure(f"navigating to {url} failed: {nav['errorText']}")
    # about:blank is "complete" too: wait for the new document.
    while not page.eval("location.href !== 'about:blank' && document.readyState === 'complete'"):
        deadline.check(f"waiting for {url} to load")
        time.sleep(0.1)
    deadline.check(f"loading {url}")
    log(f"loaded {url} ({args.viewport})")

    # Stage cards.
    expected = parse_layers(args.expect_layers)
    seen, cards, stages, got = None, [], [], []
    while True:
        if deadline.left() <= 0:
            raise Failure(f"stage cards never matched within --timeout: expected {args.expect_stages} stages "
                          f"with layers {expected}, last saw {len(stages)}: {got} (all cards: {cards})")
        cards = page.eval(CARDS_JS) or []
        stages = sorted((c for c in cards if c["stage"] is not None), key=lambda c: c["stage"])
        got = [c["layers"] for c in stages]
        if cards != seen:
            seen = cards
            log("cards:", ", ".join(f"{c['node']}[{c['layers'] or '-'}]"
                                     f"{'#' + str(c['stage']) if c['stage'] is not None else ' (worker)'}"
                                     f" {c['state']}" for c in cards) or "none")
        if len(stages) == args.expect_stages and got == expected:
            break
        time.sleep(deadline.cap(0.25))
    summary["stages"] = [{"node": c["node"], "layers": c["layers"], "state": c["state"]} for c in stages]
    summary["workers"] = [{"node": c["node"], "layers": c["layers"], "state": c["state"]}
                          for c in cards if c["stage"] is None]
    log(f"found {len(stages)} stage cards with layers {got} as expected")
    overflow = page.eval("document.documentElement.scrollWidth > window.innerWidth + 1")
    summary["overflow_x"] = bool(overflow)
    if overflow:
        log("warning: the page is wider than the viewport (horizontal overflow)")

    shot_taken = False
    if args.stream_prompt:
        # Give the page a couple of idle events first, so the chart shows the ramp.
        time.sleep(deadline.cap(1.2))
        streamer = Streamer(args.url, args.stream_prompt, args.stream_max_tokens, deadline.left())
        state["streamer"] = streamer
        streamer.start()
        samples, values = [], []
        grace_end = None
        while True:
            if deadline.left() <= 0:
                raise Failure(f"overall timeout while streaming (chunks so far {streamer.chunks}, "
                              f"done {streamer.done}, tps seen {_dedup(samples)})")
            tps_text, inflight = page.eval(TPS_JS)
            v = to_number(tps_text)
            samples.append(tps_text)
            if v is not None:
                values.append(v)
            if v is not None and v > 0 and not shot_taken:
                streaming = not streamer.finished.is_set()
                if streaming:
                    time.sleep(deadline.cap(0.6))  # let the canvas and cards repaint with this event
                page.screenshot(args.screenshot, args.full_page)
                shot_taken = True
                log(f"screenshot {'while streaming' if streaming else 'just after the stream ended'} "
                    f"(tps {tps_text}, in flight {inflight}): {args.screenshot}")
            ok = len(set(values)) >= 2 and any(x > 0 for x in values)
            if streamer.finished.is_set():
                # The page gets one event a second; a short stream may end before it shows one.
                if ok and shot_taken:
                    break
                grace_end = grace_end or time.monotonic() + 3.0
                if time.monotonic() > grace_end:
                    break
            time.sleep(deadline.cap(0.25))
        summary["tps_seen"] = _dedup(samples)
        streamer.finished.wait(deadline.cap(deadline.left()))
        if streamer.error:
            raise Failure(f"the streaming completion failed: {streamer.error}")
        if not streamer.finished.is_set():
            raise Failure("the streaming completion did not finish before the timeout")
        if not streamer.done:
            raise Failure(f"the stream ended without data: [DONE] after {streamer.chunks} chunks")
        log(f"stream finished with [DONE] after {streamer.chunks} chunks: {''.join(streamer.text)[:80]!r}")
        if not any(x > 0 for x in values):
            raise Failure(f"#tps never showed a value > 0 while the request streamed: {summary['tps_seen']}")
        if len(set(values)) < 2:
            raise Failure(f"#tps did not move while the request streamed: {summary['tps_seen']}")
        log(f"#tps moved: {summary['tps_seen']}")
    else:
        tps_text, _ = page.eval(TPS_JS)
        summary["tps_seen"] = [tps_text]
        time.sleep(deadline.cap(1.5))  # a second event, so the chart has a line

    if args.chat:
        # The chat box: typed in, sent, and the streamed answer appears.
        page.eval(f"(() => {{ document.getElementById('chat-input').value = {json.dumps(args.chat)}; "
                  "document.getElementById('chat-send').click(); return true; })()")
        answer = None
        while answer is None:
            deadline.check("waiting for the chat box's answer")
            answer = page.eval("(() => { const b = document.querySelector('.bubble.assistant[data-done]'); "
                               "return b ? b.textContent : null; })()")
            time.sleep(deadline.cap(0.2))
        if not answer or answer.startswith("Error") or answer == "(no answer)":
            raise Failure(f"the chat box got no answer: {answer!r}")
        summary["chat_answer"] = answer
        log(f"chat box answered: {answer[:80]!r}")

    if args.drain:
        # The drain control: two clicks on the worker's card; it shuts down and leaves the plan.
        click = ("(() => { const b = document.querySelector('[data-node=\"%s\"] button.drain'); "
                 "if (!b || b.classList.contains('hidden')) return false; b.click(); return true; })()" % args.drain)
        for _ in range(2):
            while not page.eval(click):
                deadline.check(f"waiting for {args.drain}'s drain button")
                time.sleep(deadline.cap(0.2))
        while True:
            deadline.check(f"waiting for {args.drain} to leave the plan after the drain")
            cards = page.eval(CARDS_JS) or []
            mine = [c for c in cards if c["node"] == args.drain]
            if mine and all(c["stage"] is None and str(c["state"]).startswith("gone") for c in mine):
                break
            time.sleep(deadline.cap(0.25))
        summary["drained"] = args.drain
        log(f"drained {args.drain}: its card shows it gone and out of the pipeline")

    if not shot_taken:
        page.screenshot(args.screenshot, args.full_page)
        log(f"screenshot: {args.screenshot}")
    summary["screenshot"] = args.screenshot
    time.sleep(deadline.cap(0.3))  # let late exception events arrive
    if browser.exceptions:
        raise Failure("uncaught JavaScript exception(s) on the page:\n  " + "\n  ".join(browser.exceptions))
    if browser.console_errors:
        raise Failure("console.error on the page:\n  " + "\n  ".join(browser.console_errors))


def _dedup(seq):
    out = []
    for x in seq:
        if not out or out[-1] != x:
            out.append(x)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="coordinator base URL, e.g. http://127.0.0.1:8080")
    ap.add_argument("--expect-stages", type=int, required=True)
    ap.add_argument("--expect-layers", required=True, help='stage layer ranges in order, e.g. "0-10,10-20,20-30"')
    ap.add_argument("--screenshot", required=True, help="PNG path (parent directories are created)")
    ap.add_argument("--stream-prompt")
    ap.add_argument("--stream-max-tokens", type=int, default=120)
    ap.add_argument("--chat", help="send this through the page's chat box and wait for the answer")
    ap.add_argument("--drain", help="drain the worker of this name with its card's control and wait for it to leave")
    ap.add_argument("--timeout", type=float, default=60.0, help="overall limit in seconds")
    ap.add_argument("--viewport", default="1400x1000", help="WIDTHxHEIGHT in CSS pixels")
    ap.add_argument("--full-page", action="store_true", help="capture the whole page, not just the viewport")
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()
    try:
        w, h = (int(x) for x in args.viewport.split("x"))
        assert w > 0 and h > 0
    except (ValueError, AssertionError):
        ap.error("--viewport must look like 1400x1000")
    args.screenshot = os.path.abspath(args.screenshot)

    deadline = Deadline(args.timeout)
    summary = {"stages": [], "tps_seen": [], "screenshot": None}
    state = {"page": None, "streamer": None}
    browser = None
    cleaned = threading.Event()

    def cleanup():
        if cleaned.is_set():
            return
        cleaned.set()
        if browser is not None:
            browser.close()

    def hard_timeout():
        # Last resort if something blocks past every deadline: kill, clean, exit.
        print(f"dashboard: FAILED: hard timeout after {args.timeout + 20:.0f}s", file=sys.stderr, flush=True)
        try:
            cleanup()
        finally:
            os._exit(1)

    watchdog = threading.Timer(args.timeout + 20, hard_timeout)
    watchdog.daemon = True
    watchdog.start()

    def on_signal(signum, _frame):
        raise Failure(f"interrupted by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    code = 1
    try:
        browser = Chromium(args.chromium, deadline)
        run(args, browser, deadline, summary, state)
        code = 0
    except Failure as e:
        print(f"dashboard: FAILED: {e}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - a bug here must still clean up and exit 1
        import traceback
        traceback.print_exc()
        print(f"dashboard: FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    finally:
        if code != 0:
            if browser is not None and browser.log_errors:
                print("dashboard: browser log errors:\n  " + "\n  ".join(browser.log_errors[-10:]), file=sys.stderr)
            page = state.get("page")
            if page is not None and browser is not None and not browser.closed:
                try:
                    # A short, separate allowance: the overall deadline may be what failed.
                    browser.deadline = Deadline(8)
                    page.screenshot(args.screenshot, args.full_page, timeout=8)
                    print(f"dashboard: screenshot of the failing state: {args.screenshot}", file=sys.stderr)
                except Exception as e:  # noqa: BLE001
                    print(f"dashboard: could not save a screenshot: {e}", file=sys.stderr)
        try:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            cleanup()
        finally:
            watchdog.cancel()
    if code == 0:
        summary["screenshot"] = args.screenshot
        if browser is not None and browser.log_errors:
            summary["browser_log_errors"] = browser.log_errors[-5:]
        print(json.dumps(summary), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
