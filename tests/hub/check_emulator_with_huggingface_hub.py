#!/usr/bin/env python3
"""Checks the local hub emulator and our cache layout against huggingface_hub.

Not a Bazel test: huggingface_hub is not installed on the development
machine. Run it where it is (the GPU host has transformers/peft, hence
huggingface_hub):

    python3 tests/hub/check_emulator_with_huggingface_hub.py [--cache DIR]

It starts tests/hub/hub_emulator.py, points huggingface_hub at it with
HF_ENDPOINT and downloads a git file, an LFS file (through the 302 to the
"CDN" host) and a missing file, then checks that the cache has the layout
HubClient writes and reads (blobs/<etag>, refs/main, relative snapshot
symlinks, .no_exist/). With --cache DIR (a cache written by the C++ client
for the same fixture, e.g. copied from a hub_client_test run), it also
checks that huggingface_hub serves those files offline. Exit code 0 = pass.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = "lorahub/interop-test"
COMMIT = "1111111111111111111111111111111111111111"
CONFIG = '{"peft_type": "LORA", "r": 16, "lora_alpha": 32}'
WEIGHTS = bytes(range(256)) * 1000


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", help="a hub cache written by the C++ client")
    args = parser.parse_args()
    tmp = tempfile.mkdtemp()
    fixture = {"repos": {REPO: {
        "refs": {"main": COMMIT},
        "commits": {COMMIT: {"files": {
            "adapter_config.json": {"text": CONFIG},
            "adapter_model.bin": {"hex": WEIGHTS.hex(), "lfs": True}}}}}}}
    with open(os.path.join(tmp, "fixture.json"), "w") as f:
        json.dump(fixture, f)
    emu = subprocess.Popen([sys.executable, os.path.join(HERE, "hub_emulator.py"),
                            "--fixture", os.path.join(tmp, "fixture.json")],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _, hub_port, _ = emu.stdout.readline().split()
    cache = os.path.join(tmp, "hub")
    os.environ["HF_ENDPOINT"] = "http://127.0.0.1:%s" % hub_port
    os.environ["HF_HUB_CACHE"] = cache
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    # Loopback only: a proxy configured on the host must not see these.
    for var in ("NO_PROXY", "no_proxy"):
        os.environ[var] = ",".join(filter(None, [os.environ.get(var), "127.0.0.1",
                                                 "127.0.0.2", "localhost"]))
    import huggingface_hub
    from huggingface_hub import hf_hub_download
    failures = []

    def check(cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            failures.append(what)

    def show_head(name):
        # What the emulator answers to the HEAD the client makes, for the log.
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", int(hub_port), timeout=10)
        conn.request("HEAD", "/%s/resolve/main/%s" % (REPO, name),
                     headers={"Accept-Encoding": "identity"})
        r = conn.getresponse()
        print("HEAD %s -> %d %s" % (name, r.status, dict(r.getheaders())))
        conn.close()

    try:
        show_head("adapter_config.json")
        show_head("adapter_model.bin")
        meta = huggingface_hub.get_hf_file_metadata(
            huggingface_hub.hf_hub_url(REPO, "adapter_model.bin"))
        print("get_hf_file_metadata(adapter_model.bin):", meta)
        check(meta.commit_hash == COMMIT, "metadata commit from X-Repo-Commit")
        check(meta.etag == hashlib.sha256(WEIGHTS).hexdigest(), "metadata etag from X-Linked-Etag")
        check(meta.size == len(WEIGHTS), "metadata size from X-Linked-Size")
        cfg = hf_hub_download(REPO, "adapter_config.json")
        w = hf_hub_download(REPO, "adapter_model.bin")
        check(open(cfg).read() == CONFIG, "config content")
        check(open(w, "rb").read() == WEIGHTS, "LFS content via the CDN redirect")
        repo_dir = os.path.join(cache, "models--lorahub--interop-test")
        sha256 = hashlib.sha256(WEIGHTS).hexdigest()
        sha1 = hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG.encode()).hexdigest()
        check(os.path.isfile(os.path.join(repo_dir, "blobs", sha256)), "blobs/<sha256>")
        check(os.path.isfile(os.path.join(repo_dir, "blobs", sha1)), "blobs/<git sha1>")
        check(open(os.path.join(repo_dir, "refs", "main")).read() == COMMIT, "refs/main")
        link = os.path.join(repo_dir, "snapshots", COMMIT, "adapter_model.bin")
        check(os.readlink(link) == "../../blobs/" + sha256, "relative snapshot symlink")
        try:
            hf_hub_download(REPO, "adapter_model.safetensors")
            check(False, "EntryNotFound raised")
        except huggingface_hub.errors.EntryNotFoundError:
            check(True, "EntryNotFound raised")
        check(os.path.exists(os.path.join(repo_dir, ".no_exist", COMMIT,
                                          "adapter_model.safetensors")), ".no_exist marker")
        if args.cache:
            os.environ["HF_HUB_CACHE"] = args.cache
            for name in ("adapter_config.json", "adapter_model.bin"):
                p = hf_hub_download(REPO, name, cache_dir=args.cache, local_files_only=True)
                check(os.path.isfile(p), "C++ cache readable offline: " + name)
    finally:
        emu.stdin.close()
        emu.wait(timeout=10)
    print("huggingface_hub", huggingface_hub.__version__, "-",
          "PASS" if not failures else "%d FAILED" % len(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
