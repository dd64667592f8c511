"""A local server that speaks the Hugging Face hub's download protocol, for testing the real
download code without the hub (none is reachable from the test machines).

It follows the hub's documented behaviour (huggingface_hub's `hf_hub_download`, the hub's
HTTP API): `GET /api/models/{repo}/revision/{rev}` lists the files (`siblings`);
`HEAD|GET /{repo}/resolve/{rev}/{file}` answers a 302 to the file store with `X-Repo-Commit`,
`X-Linked-Etag` (the LFS object's sha256, quoted) and `X-Linked-Size`; the file store serves
the bytes with `Accept-Ranges: bytes` and answers `Range: bytes=N-` with 206 and
`Content-Range`; a gated repository answers 401 (`X-Error-Code: GatedRepo`) without a valid
bearer token, and 403 with a token that has no access.

Usage: fake_hf_hub.py ROOT PORT_FILE LOG_FILE
  ROOT/{org}/{repo}/{files}      the repositories
  ROOT/{org}/{repo}/.gated       holds the one token with access
  ROOT/{org}/{repo}/.etag-{name} overrides the sha256 advertised for {name}
  ROOT/.cut-after                the first full download is cut after this many bytes (once)
The chosen port is written to PORT_FILE; every request is appended to LOG_FILE as
`METHOD PATH range=… auth=yes|no`.
"""
import hashlib
import http.server
import json
import os
import sys
import urllib.parse

root, port_file, log_file = sys.argv[1], sys.argv[2], sys.argv[3]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
hashes = {}


def sha256(path):
    if path not in hashes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        hashes[path] = h.hexdigest()
    return hashes[path]


class Hub(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def record(self):
        with open(log_file, "a") as f:
            f.write(f"{self.command} {self.path} range={self.headers.get('Range', '-')} "
                    f"auth={'yes' if self.headers.get('Authorization') else 'no'}\n")

    def reply(self, status, headers=None, body=b""):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def refuse_gated(self, repo_dir):
        gate = os.path.join(repo_dir, ".gated")
        if not os.path.exists(gate):
            return False
        token = open(gate).read().strip()
        given = self.headers.get("Authorization", "")
        if not given:
            self.reply(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repository is restricted."},
                       b'{"error":"Access to model is restricted. You must have access to it and be authenticated."}')
            return True
        if given != f"Bearer {token}":
            self.reply(403, {"X-Error-Code": "GatedRepo"}, b'{"error":"Your token has no access to this repository."}')
            return True
        return False

    def do_HEAD(self):
        self.handle_request()

    def do_GET(self):
        self.handle_request()

    def handle_request(self):
        self.record()
        path = urllib.parse.urlparse(self.path).path
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "revision":
            repo_dir = os.path.join(root, parts[2], parts[3])
            if not os.path.isdir(repo_dir):
                return self.reply(404, {"X-Error-Code": "RepoNotFound"}, b'{"error":"Repository not found"}')
            if self.refuse_gated(repo_dir):
                return
            files = []
            for base, _, names in os.walk(repo_dir):
                for n in names:
                    if not n.startswith("."):
                        files.append(os.path.relpath(os.path.join(base, n), repo_dir))
            body = json.dumps({"id": f"{parts[2]}/{parts[3]}", "sha": COMMIT,
                               "siblings": [{"rfilename": f} for f in sorted(files)]}).encode()
            return self.reply(200, {"Content-Type": "application/json"}, body)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo_dir = os.path.join(root, parts[0], parts[1])
            file = "/".join(parts[4:])
            full = os.path.join(repo_dir, file)
            if not os.path.isdir(repo_dir) or not os.path.isfile(full) or ".." in parts:
                return self.reply(404, {"X-Error-Code": "EntryNotFound"}, b'{"error":"Entry not found"}')
            if self.refuse_gated(repo_dir):
                return
            override = os.path.join(repo_dir, ".etag-" + os.path.basename(file))
            digest = open(override).read().strip() if os.path.exists(override) else sha256(full)
            location = f"/cdn/{urllib.parse.quote(parts[0])}/{urllib.parse.quote(parts[1])}/{urllib.parse.quote(file)}"
            return self.reply(302, {"Location": location, "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{digest}"',
                                    "X-Linked-Size": str(os.path.getsize(full)), "ETag": f'"{digest}"'})
        if parts[0] == "cdn":
            full = os.path.join(root, *parts[1:])
            if ".." in parts or not os.path.isfile(full):
                return self.reply(404)
            size = os.path.getsize(full)
            start = 0
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start = int(rng[len("bytes="):].split("-")[0])
                if start >= size:
                    return self.reply(416, {"Content-Range": f"bytes */{size}"})
            headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            self.send_response(206 if start else 200)
            for k, v in headers.items():
                self.send_header(k, v)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
            self.send_header("Content-Length", str(size - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            cut_file = os.path.join(root, ".cut-after")
            cut = None
            if start == 0 and os.path.exists(cut_file):
                cut = int(open(cut_file).read())
                os.remove(cut_file)
            with open(full, "rb") as f:
                f.seek(start)
                sent = 0
                while True:
                    block = f.read(1 << 16)
                    if not block:
                        break
                    if cut is not None and sent + len(block) > cut:
                        self.wfile.write(block[: cut - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        self.connection.shutdown(2)
                        return
                    self.wfile.write(block)
                    sent += len(block)
            return
        self.reply(404)


class Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # the deliberate cut breaks the connection mid-answer; nothing to report


server = Server(("127.0.0.1", 0), Hub)
with open(port_file + ".tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(port_file + ".tmp", port_file)
server.serve_forever()
