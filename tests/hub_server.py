"""A small in-memory stand-in for the Hugging Face Hub HTTP API, enough for huggingface_hub's real client to
create a repository, commit files, list them, and download them (`resolve`). Nothing like it exists as open source;
it runs on 127.0.0.1 in the test.

As the Hub does, it sends weights (`*.safetensors`) through Git LFS: pre-upload answers "lfs", the client asks the
LFS batch endpoint where to put the object, PUTs it there, has it verified, and the commit names it by sha256; every
other file travels inside the commit. (The Hub also offers Xet storage, which huggingface_hub uses where `hf_xet`
is installed; the tests set HF_HUB_DISABLE_XET=1, so the LFS protocol is what they exercise.) With `writers`, only
those tokens may write, each to its own namespaces: anything else is refused as the Hub refuses it (401, 403).
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse

REPO = r"(?P<repo>[^/]+/[^/]+)"


class FakeHub:
    def __init__(self, writers: dict[str, set[str]] | None = None):
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "branches": {name: {"sha", "files"}}}
        self.writers = writers  # token -> the namespaces it may write to; None: any request may write
        self.lfs: dict[str, bytes] = {}  # sha256 -> an object uploaded through LFS
        self.lfs_paths: set[str] = set()  # the files commits named as LFS objects
        self.requests: list[tuple[str, str, dict]] = []  # (method, path, headers): what the client sent
        self.commits = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info):
        self.server.shutdown()

    def files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        return self.repos[repo_id]["branches"][branch]["files"]

    def publish(self, repo_id: str, folder, branch: str = "main"):
        """Put every file of `folder` on `branch` of `repo_id`, as if it had been pushed."""
        repo = self.repos.setdefault(repo_id, {"private": False, "branches": {}})
        self.commits += 1
        repo["branches"][branch] = {"sha": hashlib.sha1(f"{repo_id}@{self.commits}".encode()).hexdigest(),
                                    "files": {path.name: path.read_bytes() for path in folder.iterdir()}}

    def handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def reply(self, status: int, body=None, headers=None):
                data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def missing(self, code: str, message: str):
                self.reply(404, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

            def body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def route(self):
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, {key.lower(): value for key, value in self.headers.items()}))
                for methods, pattern, handle in ROUTES:
                    match = re.fullmatch(pattern, path)
                    if match and self.command in methods:
                        return handle(self, **match.groupdict())
                self.missing("RouteNotFound", f"{self.command} {path}")

            do_GET = do_POST = do_HEAD = do_PUT = route

            def may_write(self, repo: str) -> bool:
                """As the Hub: no token or an unknown one is 401, a token without rights to the namespace 403."""
                if hub.writers is None:
                    return True
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if token not in hub.writers:
                    self.reply(401, {"error": "Invalid credentials in Authorization header"},
                               {"X-Error-Message": "Invalid credentials in Authorization header"})
                    return False
                namespace = repo.split("/")[0]
                if namespace not in hub.writers[token]:
                    message = f'You don\'t have the rights to create a model under the namespace "{namespace}"'
                    self.reply(403, {"error": message}, {"X-Error-Message": message})
                    return False
                return True

            def branch(self, repo: str, revision: str):
                if repo not in hub.repos:
                    return self.missing("RepoNotFound", f"Repository {repo} not found")
                branches = hub.repos[repo]["branches"]
                by_commit = {branch["sha"]: branch for branch in branches.values()}  # clients pin the commit
                if revision not in branches and revision not in by_commit:
                    return self.missing("RevisionNotFound", f"Revision {revision} not found")
                return branches.get(revision) or by_commit[revision]

            def create_repo(self):
                request = json.loads(self.body())
                repo = f"{request.get('organization') or 'user'}/{request['name']}"
                if not self.may_write(repo):
                    return
                if repo in hub.repos:
                    return self.reply(409, {"error": "You already created this model repo"})
                private = request.get("visibility", "public") != "public" or bool(request.get("private"))
                hub.repos[repo] = {"private": private,
                                   "branches": {"main": {"sha": "0" * 40, "files": {}}}}
                self.reply(200, {"url": f"{hub.url}/{repo}", "name": repo})

            def create_branch(self, repo, branch):
                main = self.branch(repo, "main") if self.may_write(repo) else None
                if main is not None:
                    hub.repos[repo]["branches"].setdefault(branch, {"sha": main["sha"], "files": dict(main["files"])})
                    self.reply(200, {})

            def validate_yaml(self):
                self.body()
                self.reply(200, {"errors": [], "warnings": []})

            def preupload(self, repo, revision):
                files = json.loads(self.body())["files"]
                if self.may_write(repo) and self.branch(repo, revision) is not None:
                    modes = {f["path"]: "lfs" if f["path"].endswith(".safetensors") else "regular" for f in files}
                    self.reply(200, {"files": [{"path": path, "uploadMode": mode, "shouldIgnore": False}
                                               for path, mode in modes.items()]})

            def lfs_batch(self, repo):
                request = json.loads(self.body())
                if not self.may_write(repo):
                    return
                assert request["operation"] == "upload" and "basic" in request["transfers"], request
                self.reply(200, {"transfer": "basic", "objects": [
                    {"oid": item["oid"], "size": item["size"], "authenticated": True,
                     "actions": {"upload": {"href": f"{hub.url}/lfs/{item['oid']}"},
                                 "verify": {"href": f"{hub.url}/lfs/{item['oid']}/verify"}}}
                    for item in request["objects"]]}, {"Content-Type": "application/vnd.git-lfs+json"})

            def lfs_upload(self, oid):
                data = self.body()
                if hashlib.sha256(data).hexdigest() != oid:
                    return self.reply(400, {"error": "sha256 mismatch"})
                hub.lfs[oid] = data
                self.reply(200, {})

            def lfs_verify(self, oid):
                request = json.loads(self.body())
                if request["oid"] not in hub.lfs or len(hub.lfs[request["oid"]]) != request["size"]:
                    return self.missing("EntryNotFound", f"LFS object {oid} was not uploaded")
                self.reply(200, {})

            def commit(self, repo, revision):
                lines = [json.loads(line) for line in self.body().splitlines() if line.strip()]
                if not self.may_write(repo):
                    return
                branch = self.branch(repo, revision)
                if branch is None:
                    return
                for line in lines:
                    if line["key"] == "file":
                        branch["files"][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                    elif line["key"] == "lfsFile":
                        branch["files"][line["value"]["path"]] = hub.lfs[line["value"]["oid"]]
                        hub.lfs_paths.add(f"{repo}/{line['value']['path']}")
                    elif line["key"] == "deletedFile":
                        branch["files"].pop(line["value"]["path"], None)
                # A new commit id for every commit: git's depends on the parent; a counter stands in for the tree.
                hub.commits += 1
                branch["sha"] = hashlib.sha1(f"{repo}@{hub.commits}".encode()).hexdigest()
                url = f"{hub.url}/{repo}/commit/{branch['sha']}"
                self.reply(200, {"commitUrl": url, "commitOid": branch["sha"], "pullRequestUrl": None})

            def repo_info(self, repo, revision="main"):
                branch = self.branch(repo, revision)
                if branch is not None:
                    self.reply(200, {"id": repo, "modelId": repo, "sha": branch["sha"],
                                     "private": hub.repos[repo]["private"],
                                     "siblings": [{"rfilename": name} for name in sorted(branch["files"])]})

            def tree(self, repo, revision, folder=""):
                branch = self.branch(repo, revision)
                if branch is not None:
                    self.reply(200, [{"type": "file", "path": name, "size": len(data),
                                      "oid": hashlib.sha1(data).hexdigest()}
                                     for name, data in sorted(branch["files"].items()) if name.startswith(folder)])

            def resolve(self, repo, revision, name):
                branch = self.branch(repo, revision)
                if branch is None:
                    return
                if name not in branch["files"]:
                    return self.missing("EntryNotFound", f"{name} not found in {repo}")
                data = branch["files"][name]
                self.reply(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": branch["sha"],
                                       "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

        ROUTES = [
            ("POST", r"/api/repos/create", Handler.create_repo),
            ("POST", r"/api/validate-yaml", Handler.validate_yaml),
            ("POST", rf"/api/models/{REPO}/branch/(?P<branch>.+)", Handler.create_branch),
            ("POST", rf"/api/models/{REPO}/preupload/(?P<revision>.+)", Handler.preupload),
            ("POST", rf"/api/models/{REPO}/commit/(?P<revision>.+)", Handler.commit),
            ("GET", rf"/api/models/{REPO}/tree/(?P<revision>[^/]+)/?(?P<folder>.*)", Handler.tree),
            ("GET", rf"/api/models/{REPO}/revision/(?P<revision>.+)", Handler.repo_info),
            ("GET", rf"/api/models/{REPO}", Handler.repo_info),
            ("GET HEAD", rf"/{REPO}/resolve/(?P<revision>[^/]+)/(?P<name>.+)", Handler.resolve),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", Handler.lfs_batch),
            ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", Handler.lfs_upload),
            ("POST", r"/lfs/(?P<oid>[0-9a-f]{64})/verify", Handler.lfs_verify),
        ]
        return Handler
