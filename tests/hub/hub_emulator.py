#!/usr/bin/python3
"""Local Hugging Face Hub emulator (test double), standard library only.

Implements the contract of hub_protocol.md section 11 for the lorahub hub
client tests: resolve HEAD/GET with the real headers (git files answered
directly with a git-blob sha1 ETag, LFS files with a 302 to a second "CDN"
server with X-Linked-Etag / X-Linked-Size), Range requests, error headers
(X-Error-Code / X-Error-Message), per-repo Bearer tokens, gated repos,
renamed repos (relative redirects), the model-info JSON, a request log and
fault switches.

Usage: hub_emulator.py --fixture FIXTURE.json
Prints "PORTS <hub_port> <cdn_port>" on stdout once both servers listen
(ephemeral ports), then serves until killed or stdin closes. The hub listens
on 127.0.0.1; the "CDN" on 127.0.0.2 (another loopback address, so that it
is another host, as the real CDN is: a client that follows same-host
redirects must still not follow the LFS 302 during its HEAD), falling back
to 127.0.0.1 where that address cannot be bound.

Headers as the real Hub sends them: every resolve reply (200, 302, 404) has
X-Repo-Commit (404s for a missing entry too), X-Request-Id and
Access-Control-Expose-Headers; git files have ETag "<git sha1>"; LFS files
a 302 with X-Linked-Etag "<sha256>", X-Linked-Size, ETag and Location; the
CDN answers with ETag, Content-Length, Accept-Ranges, Content-Type and
Content-Disposition.

Fixture: {"repos": {"org/name": {
    "refs": {"main": "<40-hex commit>", ...},
    "commits": {"<commit>": {"files": {"path/in/repo":
        {"text": "..." | "hex": "...", "lfs": true|false}}}},
    "tokens": ["tok", ...],          # non-empty: private repo
    "gated": false,
    "renamed_from": ["old/name"]}}}

Admin routes (hub host only, never logged):
  GET  /_admin/log       -> [{"method","path","host","range","auth"}...]
  POST /_admin/reset     -> clears the log and all faults
  POST /_admin/fault     <- {"kind": K, "count": N (-1 = forever),
                             "host": "hub"|"cdn", "method": "GET"|"HEAD",
                             "path_contains": S, ...parameters}
     kinds: status(status), drop_after_bytes(bytes), ignore_range,
            wrong_content_length(delta), omit_header(header: X-Repo-Commit |
            ETag | size), weak_etag, corrupt_body, stall_ms(ms, where:
            "headers"|"body"), down (close the connection, no reply)
  POST /_admin/move_ref  <- {"repo": R, "ref": "main", "commit": C}
"""

import argparse
import hashlib
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class State:
    def __init__(self, fixture):
        self.lock = threading.Lock()
        self.log = []
        self.faults = []
        self.repos = {}
        self.renames = {}
        self.lfs_blobs = {}  # sha256 -> bytes
        self.cdn_port = 0
        self.cdn_host = "127.0.0.1"
        self.request_ids = 0
        for repo_id, spec in fixture["repos"].items():
            commits = {}
            for commit, cspec in spec.get("commits", {}).items():
                files = {}
                for path, fspec in cspec.get("files", {}).items():
                    if "hex" in fspec:
                        data = bytes.fromhex(fspec["hex"])
                    else:
                        data = fspec.get("text", "").encode()
                    lfs = bool(fspec.get("lfs", False))
                    sha256 = hashlib.sha256(data).hexdigest()
                    sha1 = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                    files[path] = {"data": data, "lfs": lfs, "sha256": sha256,
                                   "sha1": sha1}
                    if lfs:
                        self.lfs_blobs[sha256] = data
                commits[commit] = files
            self.repos[repo_id] = {
                "refs": dict(spec.get("refs", {})),
                "commits": commits,
                "tokens": list(spec.get("tokens", [])),
                "gated": bool(spec.get("gated", False)),
            }
            for old in spec.get("renamed_from", []):
                self.renames[old] = repo_id

    def take_faults(self, host, method, path):
        """Returns the faults matching this request, consuming one use each.

        At most one fault of each kind applies (the oldest), so two queued
        status faults hit two successive requests.
        """
        taken = []
        kinds = set()
        with self.lock:
            for f in self.faults:
                if f.get("count", -1) == 0 or f["kind"] in kinds:
                    continue
                if f.get("host") and f["host"] != host:
                    continue
                if f.get("method") and f["method"] != method:
                    continue
                if f.get("path_contains") and f["path_contains"] not in path:
                    continue
                if f.get("count", -1) > 0:
                    f["count"] -= 1
                kinds.add(f["kind"])
                taken.append(f)
        return taken


def pointer_sha1(sha256, size):
    text = ("version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n"
            % (sha256, size)).encode()
    return hashlib.sha1(b"blob %d\0" % len(text) + text).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-emulator/1.0"

    def log_message(self, fmt, *args):  # keep the test output quiet
        pass

    def handle(self):
        # Clients under test hang up mid-request (timeouts, cancellation).
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            pass

    @property
    def state(self):
        return self.server.state

    def do_HEAD(self):
        self.handle_any("HEAD")

    def do_GET(self):
        self.handle_any("GET")

    def do_POST(self):
        self.handle_any("POST")

    # ----------------------------------------------------------- helpers
    def reply(self, status, headers, body=b"", faults=(), drop_after=None):
        kinds = {f["kind"]: f for f in faults}
        omit = {f.get("header", "").lower() for f in faults
                if f["kind"] == "omit_header"}
        if "size" in omit:
            omit |= {"x-linked-size", "content-length"}
        if "etag" in omit:
            omit |= {"x-linked-etag"}
        if "stall_ms" in kinds and kinds["stall_ms"].get("where", "headers") == "headers":
            time.sleep(kinds["stall_ms"].get("ms", 1000) / 1000.0)
        self.send_response(status)
        for name, value in headers:
            if name.lower() in omit:
                continue
            if "weak_etag" in kinds and name.lower() in ("etag", "x-linked-etag"):
                value = "W/" + value
            self.send_header(name, value)
        if "content-length" not in omit:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD" or not body:
            return
        if drop_after is not None:
            self.wfile.write(body[:drop_after])
            self.wfile.flush()
            self.close_connection = True
            return
        if "stall_ms" in kinds and kinds["stall_ms"].get("where") == "body":
            half = len(body) // 2
            self.wfile.write(body[:half])
            self.wfile.flush()
            time.sleep(kinds["stall_ms"].get("ms", 1000) / 1000.0)
            self.wfile.write(body[half:])
        else:
            self.wfile.write(body)

    def hub_headers(self):
        """Headers the real Hub adds to every resolve reply."""
        with self.state.lock:
            self.state.request_ids += 1
            rid = "Root=1-emulated-%08d" % self.state.request_ids
        return [("X-Request-Id", rid),
                ("Access-Control-Expose-Headers",
                 "X-Repo-Commit,X-Request-Id,X-Error-Code,X-Error-Message,"
                 "X-Total-Count,ETag,Link,Accept-Ranges,Content-Range,"
                 "X-Linked-Size,X-Linked-ETag"),
                ("Vary", "Origin, Accept")]

    def error(self, status, code, message, extra=(), faults=()):
        headers = self.hub_headers() + [("X-Error-Code", code), ("X-Error-Message", message)]
        headers += list(extra)
        body = json.dumps({"error": message}).encode()
        headers.append(("Content-Type", "application/json"))
        self.reply(status, headers, body, faults)

    def serve_bytes(self, data, headers, faults):
        """Serves `data` honouring Range and the body faults."""
        kinds = {f["kind"]: f for f in faults}
        if "corrupt_body" in kinds and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        rng = self.headers.get("Range")
        status = 200
        body = data
        if rng and "ignore_range" not in kinds and rng.startswith("bytes="):
            start_s, _, end_s = rng[len("bytes="):].partition("-")
            start = int(start_s)
            end = int(end_s) if end_s else len(data) - 1
            if start >= len(data):
                self.reply(416, headers + [("Content-Range", "bytes */%d" % len(data))],
                           b"", faults)
                return
            body = data[start:end + 1]
            status = 206
            headers = headers + [("Content-Range", "bytes %d-%d/%d"
                                  % (start, start + len(body) - 1, len(data)))]
        drop = kinds.get("drop_after_bytes")
        self.reply(status, headers + [("Accept-Ranges", "bytes")], body, faults,
                   drop_after=drop.get("bytes", 0) if drop else None)

    def authorized(self, repo):
        if not repo["tokens"]:
            return True
        auth = self.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and auth[len("Bearer "):] in repo["tokens"]

    # ----------------------------------------------------------- dispatch
    def handle_any(self, method):
        host = self.server.role
        raw_path = self.path
        if host == "hub" and raw_path.startswith("/_admin/"):
            self.admin(method, raw_path)
            return
        with self.state.lock:
            self.state.log.append({
                "method": method, "path": raw_path, "host": host,
                "range": self.headers.get("Range"),
                "auth": self.headers.get("Authorization"),
            })
        faults = self.state.take_faults(host, method, raw_path)
        kinds = {f["kind"]: f for f in faults}
        if "down" in kinds:
            self.close_connection = True
            return
        if "redirect" in kinds:
            self.reply(int(kinds["redirect"].get("status", 307)),
                       [("Location", kinds["redirect"]["location"])], b"", faults)
            return
        if "status" in kinds:
            st = int(kinds["status"].get("status", 500))
            self.reply(st, [("Content-Type", "text/plain")], b"injected fault", faults)
            return
        if host == "cdn":
            self.cdn(raw_path, faults)
        else:
            self.hub(raw_path, faults)

    def cdn(self, raw_path, faults):
        path = urllib.parse.urlsplit(raw_path).path
        sha = path.rsplit("/", 1)[-1]
        data = self.state.lfs_blobs.get(sha)
        if data is None:
            self.reply(404, [("Content-Type", "text/plain")], b"no such object", faults)
            return
        self.serve_bytes(data, [("ETag", '"%s"' % sha),
                                ("Content-Type", "application/octet-stream"),
                                ("Content-Disposition",
                                 'attachment; filename="%s"' % sha)], faults)

    def resolve_revision(self, repo, rev):
        if rev in repo["refs"]:
            return repo["refs"][rev]
        if rev in repo["commits"]:
            return rev
        return None

    def hub(self, raw_path, faults):
        path = urllib.parse.urlsplit(raw_path).path
        if path.startswith("/api/models/"):
            self.api(path[len("/api/models/"):], faults)
            return
        for prefix in ("/datasets/", "/spaces/"):
            if path.startswith(prefix):
                path = "/" + path[len(prefix):]
        if "/resolve/" not in path:
            self.error(404, "RepoNotFound", "Not Found", faults=faults)
            return
        repo_id, _, rest = path[1:].partition("/resolve/")
        rev_enc, _, file_enc = rest.partition("/")
        rev = urllib.parse.unquote(rev_enc)
        filename = urllib.parse.unquote(file_enc)
        if repo_id in self.state.renames:
            new = self.state.renames[repo_id]
            self.reply(307, [("Location", "/%s/resolve/%s/%s" % (new, rev_enc, file_enc))],
                       b"", faults)
            return
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self.error(404, "RepoNotFound", "Repository not found", faults=faults)
            return
        if not self.authorized(repo):
            self.error(401, "RepoNotFound", "Invalid credentials in Authorization header",
                       faults=faults)
            return
        if repo["gated"] and not (repo["tokens"] and self.headers.get("Authorization")):
            self.error(403, "GatedRepo", "Access to this model is restricted", faults=faults)
            return
        with self.state.lock:
            commit = self.resolve_revision(repo, rev)
        if commit is None:
            self.error(404, "RevisionNotFound", "Invalid rev id: %s" % rev, faults=faults)
            return
        entry = repo["commits"][commit].get(filename)
        if entry is None:
            self.error(404, "EntryNotFound", "Entry not found",
                       extra=[("X-Repo-Commit", commit)], faults=faults)
            return
        size_delta = 0
        for f in faults:
            if f["kind"] == "wrong_content_length":
                size_delta = int(f.get("delta", -1))
        if entry["lfs"]:
            location = "http://%s:%d/lfs/%s?X-Amz-Signature=emulated" % (
                self.state.cdn_host, self.state.cdn_port, entry["sha256"])
            headers = self.hub_headers() + [("X-Repo-Commit", commit),
                       ("X-Linked-Etag", '"%s"' % entry["sha256"]),
                       ("X-Linked-Size", str(len(entry["data"]) + size_delta)),
                       ("ETag", '"%s"' % pointer_sha1(entry["sha256"], len(entry["data"]))),
                       ("Location", location)]
            self.reply(302, headers, b"", faults)
            return
        headers = self.hub_headers() + [
            ("X-Repo-Commit", commit), ("ETag", '"%s"' % entry["sha1"]),
            ("Content-Type", "application/octet-stream")]
        if size_delta and self.command == "HEAD":
            # Advertise a wrong size: HEAD carries only the headers.
            self.reply(200, headers, b"\0" * max(0, len(entry["data"]) + size_delta), faults)
            return
        self.serve_bytes(entry["data"], headers, faults)

    def api(self, rest, faults):
        repo_id, _, rev_part = rest.partition("/revision/")
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self.error(404, "RepoNotFound", "Repository not found", faults=faults)
            return
        if not self.authorized(repo):
            self.error(401, "RepoNotFound", "Invalid credentials", faults=faults)
            return
        rev = urllib.parse.unquote(rev_part) if rev_part else "main"
        with self.state.lock:
            commit = self.resolve_revision(repo, rev)
        if commit is None:
            self.error(404, "RevisionNotFound", "Invalid rev id: %s" % rev, faults=faults)
            return
        blobs = "blobs=true" in (urllib.parse.urlsplit(self.path).query or "")
        siblings = []
        for name, entry in sorted(repo["commits"][commit].items()):
            sib = {"rfilename": name}
            if blobs:
                sib["size"] = len(entry["data"])
                sib["blobId"] = (pointer_sha1(entry["sha256"], len(entry["data"]))
                                 if entry["lfs"] else entry["sha1"])
                if entry["lfs"]:
                    sib["lfs"] = {"size": len(entry["data"]), "sha256": entry["sha256"],
                                  "pointerSize": 134}
            siblings.append(sib)
        body = json.dumps({"id": repo_id, "sha": commit, "siblings": siblings}).encode()
        self.reply(200, [("Content-Type", "application/json")], body, faults)

    def admin(self, method, raw_path):
        length = int(self.headers.get("Content-Length") or 0)
        payload = json.loads(self.rfile.read(length) or b"null") if length else None
        route = urllib.parse.urlsplit(raw_path).path
        st = self.state
        if route == "/_admin/log":
            with st.lock:
                body = json.dumps(st.log).encode()
        elif route == "/_admin/reset" and method == "POST":
            with st.lock:
                st.log.clear()
                st.faults.clear()
            body = b"{}"
        elif route == "/_admin/fault" and method == "POST":
            with st.lock:
                st.faults.append(dict(payload))
            body = b"{}"
        elif route == "/_admin/move_ref" and method == "POST":
            with st.lock:
                repo = st.repos[payload["repo"]]
                if payload["commit"] not in repo["commits"]:
                    self.reply(400, [], b"unknown commit")
                    return
                repo["refs"][payload["ref"]] = payload["commit"]
            body = b"{}"
        else:
            self.reply(404, [], b"unknown admin route")
            return
        self.reply(200, [("Content-Type", "application/json")], body)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixture", required=True)
    args = parser.parse_args()
    with open(args.fixture) as f:
        state = State(json.load(f))
    servers = []
    for role in ("hub", "cdn"):
        host = "127.0.0.1"
        if role == "cdn":
            try:
                probe = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
                probe.server_close()
                host = "127.0.0.2"
            except OSError:
                print("hub_emulator: 127.0.0.2 cannot be bound; the CDN shares "
                      "the hub's host", file=sys.stderr)
            state.cdn_host = host
        server = ThreadingHTTPServer((host, 0), Handler)
        server.daemon_threads = True
        server.state = state
        server.role = role
        servers.append(server)
    state.cdn_port = servers[1].server_address[1]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("PORTS %d %d" % (servers[0].server_address[1], servers[1].server_address[1]),
          flush=True)
    # Exit when the test closes our stdin (or dies): no orphaned servers.
    sys.stdin.read()


if __name__ == "__main__":
    main()
