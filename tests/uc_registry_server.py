"""A local HTTP server that answers the Unity Catalog model-registry REST calls MLflow's
``databricks-uc`` client makes, so that the client (its checks included) runs unmodified.

What it answers, as Databricks documents them and as MLflow 3.17's protos spell them
(``mlflow/protos/databricks_uc_registry_service.proto``, ``databricks_filesystem_service.proto``):

* ``registered-models/create`` (``RESOURCE_ALREADY_EXISTS`` the second time) and ``/get``;
* ``model-versions/create`` (version numbers 1, 2, ... per model, status ``PENDING_REGISTRATION``),
  ``/generate-temporary-credentials`` (``storage_mode: DEFAULT_STORAGE``, so MLflow uploads through
  presigned URLs), ``/finalize`` (status ``READY``), ``/get`` and ``/get-download-uri`` (the
  version's storage location, which MLflow does not read directly under DEFAULT_STORAGE);
* ``registered-models:is-databricks-sdk-models-artifact-repository-enabled`` (false);
* ``/api/2.0/fs/create-upload-url`` (a URL on this server) and the ``PUT`` of each file to it;
  for reading a version back, ``/api/2.0/fs/directories/<path>`` (listing),
  ``/api/2.0/fs/create-download-url`` and the ``GET`` of each file;
* ``/.well-known/databricks-config`` (the SDK's host-metadata probe) with 404 on purpose: the SDK
  then uses the host and token it was given, as it does against workspaces without that document.

Anything else gets 404 and is recorded in :attr:`UnityCatalogServer.unanswered`, so a test can
assert that the client made no call the server does not know. Three-level names are required, as
in Unity Catalog. Uploaded files are kept in memory (:attr:`UnityCatalogServer.files`).
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import parse_qs, urlparse

UC = "/api/2.0/mlflow/unity-catalog"
_NAME = re.compile(r"^[A-Za-z0-9_]+\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+$")


class UnityCatalogServer:
    """In-memory Unity Catalog model registry on ``http://127.0.0.1:<port>``.

    Attributes:
        models: registered model name -> ``{"name", "versions": {version: model_version}}``.
        files: ``/Models/<catalog>/<schema>/<model>/<version>/<path>`` -> bytes uploaded.
        calls: ``(method, path)`` of every request, in order.
        unanswered: requests answered 404 because no handler knows them.
    """

    def __init__(self) -> None:
        self.models: dict[str, dict] = {}
        self.files: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.unanswered: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._http: Optional[ThreadingHTTPServer] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_port}"

    def __enter__(self) -> "UnityCatalogServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                status, payload = server.handle(self.command, self.path, body)
                raw = isinstance(payload, bytes)
                data = payload if raw else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream" if raw else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

            def log_message(self, *args):  # quiet
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._http.shutdown()
        self._http.server_close()

    # ------------------------------------------------------------------ requests

    def handle(self, method: str, raw_path: str, body: bytes) -> tuple[int, dict]:
        """(HTTP status, JSON body) for one request."""
        url = urlparse(raw_path)
        path = url.path
        with self._lock:
            self.calls.append((method, path))
            if method == "PUT" and path.startswith("/upload/"):
                self.files[path[len("/upload"):]] = body
                return 200, {}
            if method == "GET" and path.startswith("/download/"):
                data = self.files.get(path[len("/download"):])
                return (200, data) if data is not None else self._error(404, "NOT_FOUND", path)
            if method == "GET" and path.startswith("/api/2.0/fs/directories/"):
                return self._list(path[len("/api/2.0/fs/directories"):])
            if method == "GET" and path == "/.well-known/databricks-config":
                return self._error(404, "NOT_FOUND", "no host metadata")
            args = json.loads(body) if body else {}
            args.update({k: v[0] for k, v in parse_qs(url.query).items()})
            route = {
                ("POST", f"{UC}/registered-models/create"): self._create_model,
                ("GET", f"{UC}/registered-models/get"): self._get_model,
                ("POST", f"{UC}/model-versions/create"): self._create_version,
                ("POST", f"{UC}/model-versions/generate-temporary-credentials"): self._credentials,
                ("POST", f"{UC}/model-versions/finalize"): self._finalize,
                ("GET", f"{UC}/model-versions/get"): self._get_version,
                ("GET", f"{UC}/model-versions/get-download-uri"): self._download_uri,
                ("GET", f"{UC}/registered-models:is-databricks-sdk-models-artifact-repository-enabled"):
                    lambda a: (200, {"is_databricks_sdk_models_artifact_repository_enabled": False}),
                ("POST", "/api/2.0/fs/create-upload-url"): self._upload_url,
                ("POST", "/api/2.0/fs/create-download-url"): self._download_url,
            }.get((method, path))
            if route is None:
                self.unanswered.append((method, path))
                return 404, {"error_code": "ENDPOINT_NOT_FOUND", "message": f"no {method} {path}"}
            return route(args)

    @staticmethod
    def _error(status: int, code: str, message: str) -> tuple[int, dict]:
        return status, {"error_code": code, "message": message}

    def _create_model(self, a):
        name = a.get("name", "")
        if not _NAME.match(name):
            return self._error(400, "INVALID_PARAMETER_VALUE",
                               f"{name!r} is not a three-level name catalog.schema.model")
        if name in self.models:
            return self._error(400, "RESOURCE_ALREADY_EXISTS", f"model {name} already exists")
        self.models[name] = {"name": name, "versions": {}}
        return 200, {"registered_model": {"name": name}}

    def _get_model(self, a):
        m = self.models.get(a.get("full_name") or a.get("name"))
        if m is None:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", "no such model")
        return 200, {"registered_model": {"name": m["name"]}}

    def _create_version(self, a):
        m = self.models.get(a.get("name"))
        if m is None:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", f"model {a.get('name')} not found")
        version = str(len(m["versions"]) + 1)
        mv = {"name": m["name"], "version": version, "source": a.get("source"),
              "run_id": a.get("run_id"), "tags": a.get("tags", []),
              "status": "PENDING_REGISTRATION",
              "storage_location": f"s3://uc-bucket/models/{m['name']}/{version}"}
        m["versions"][version] = mv
        return 200, {"model_version": mv}

    def _version(self, a):
        m = self.models.get(a.get("name") or a.get("full_name"))
        return None if m is None else m["versions"].get(str(a.get("version")))

    def _credentials(self, a):
        if self._version(a) is None:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", "no such model version")
        return 200, {"credentials": {"storage_mode": "DEFAULT_STORAGE"}}

    def _finalize(self, a):
        mv = self._version(a)
        if mv is None:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", "no such model version")
        prefix = "/Models/" + mv["name"].replace(".", "/") + f"/{mv['version']}/"
        if f"{prefix}MLmodel" not in self.files:  # what Unity Catalog serves must be a model
            return self._error(400, "INVALID_STATE", f"no MLmodel uploaded under {prefix}")
        mv["status"] = "READY"
        return 200, {"model_version": mv}

    def _get_version(self, a):
        mv = self._version(a)
        if mv is None:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", "no such model version")
        return 200, {"model_version": mv}

    def _download_uri(self, a):
        mv = self._version(a)
        if mv is None:
            return self._error(404, "RESOURCE_DOES_NOT_EXIST", "no such model version")
        return 200, {"artifact_uri": mv["storage_location"]}

    def _upload_url(self, a):
        path = a.get("path", "")
        if not path.startswith("/Models/"):
            return self._error(400, "INVALID_PARAMETER_VALUE", f"upload outside /Models: {path}")
        return 200, {"url": f"{self.url}/upload{path}", "headers": []}

    def _download_url(self, a):
        path = a.get("path", "")
        if path not in self.files:
            return self._error(404, "NOT_FOUND", f"no file {path}")
        return 200, {"url": f"{self.url}/download{path}", "headers": []}

    def _list(self, folder: str):
        """The immediate children of ``folder`` among the uploaded files (Files API listing)."""
        prefix = folder.rstrip("/") + "/"
        entries = {}
        for path, data in self.files.items():
            if path.startswith(prefix):
                head, sep, _ = path[len(prefix):].partition("/")
                entries[prefix + head] = {"path": prefix + head, "is_directory": bool(sep),
                                          **({} if sep else {"file_size": len(data)})}
        if not entries:
            return self._error(404, "NOT_FOUND", f"no directory {folder}")
        return 200, {"contents": sorted(entries.values(), key=lambda e: e["path"])}

    def version_files(self, name: str, version: str) -> dict[str, bytes]:
        """Files uploaded for one model version, by path relative to the version's root."""
        prefix = "/Models/" + name.replace(".", "/") + f"/{version}/"
        return {k[len(prefix):]: v for k, v in self.files.items() if k.startswith(prefix)}
