"""A fake Civitai and Hugging Face Hub on loopback that publishes whatever a test gives it.

The mini-world hub only publishes well-formed experts; hostile answers (a pickle-only repo, a
file name with ../ in it, a download that redirects to another host, an endless API answer)
come from here, in the real wire format and field names, so the real source clients read
them over HTTP. Every request is logged as (path, Authorization header).

    site = FakeSite()
    with serve(site.app) as url:
        site.url = url
        model_id = site.publish_civitai("x.safetensors", data)      # -> civitai:<model_id>
        site.publish_hf("someone/repo", {"x.safetensors": data})   # -> hf:someone/repo

Files are served at ``/files/<key>`` (Civitai ``downloadUrl``) and at the Hub's
``/<repo>/resolve/<sha>/<name>``; homepages at ``/models/<id>/<slug>`` and ``/<repo>`` (a
minimal page unless a test sets one); ``redirects`` maps a path to a URL it answers 302 with,
``answers`` a path to a canned (status, content type, body) answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse


def minimal_page(title: str, body: str = "<p>A perfectly normal LoRA.</p>") -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>'
            f"<body><main><h1>{title}</h1>{body}</main></body></html>")


class FakeSite:
    """Civitai v1 and Hub shaped answers publishing whatever a test gives, in the real field names."""

    def __init__(self):
        self.civitai: list = []  # the items of /api/v1/models (tests may append malformed ones)
        self.hf: dict[str, dict] = {}  # repo id -> /api/models/{repo} answer
        self.blobs: dict[str, bytes] = {}
        self.pages: dict[str, tuple[int, str]] = {}  # path -> (status, HTML)
        self.redirects: dict[str, str] = {}  # path -> Location (302)
        self.answers: dict[str, tuple[int, str, str]] = {}  # path -> (status, content type, body)
        self.streams: dict[str, int] = {}  # path -> bytes of an endless-looking answer (no Content-Length)
        self.seen: list[tuple[str, str | None]] = []  # (path, Authorization header) of every request
        self.url = ""
        self.app = FastAPI()

        @self.app.middleware("http")
        async def log(request: Request, call_next):
            path = request.url.path
            self.seen.append((path, request.headers.get("authorization")))
            if path in self.redirects:
                return RedirectResponse(self.redirects[path], 302)
            if path in self.answers:
                status, content_type, body = self.answers[path]
                return Response(body, status, media_type=content_type)
            if path in self.streams:
                size = self.streams[path]

                def chunks() -> Iterator[bytes]:
                    sent = 0
                    while sent < size:
                        chunk = b" " * min(1 << 16, size - sent)
                        sent += len(chunk)
                        yield chunk
                return StreamingResponse(chunks(), media_type="application/json")
            return await call_next(request)

        self.app.get("/api/v1/models")(lambda: {"items": self.civitai, "metadata": {}})
        self.app.get("/api/models")(lambda: [{"id": i, "lastModified": m["lastModified"]} for i, m in self.hf.items()])

        @self.app.get("/api/models/{owner}/{repo}")
        def model_info(owner: str, repo: str):
            info = self.hf.get(f"{owner}/{repo}")
            return info if info is not None else JSONResponse({"error": "Repository not found"}, 404)

        @self.app.get("/files/{key}")
        def blob(key: str):
            return self._blob(key)

        @self.app.get("/{owner}/{repo}/resolve/{sha}/{name:path}")
        def resolve(owner: str, repo: str, sha: str, name: str):
            return self._blob(f"{owner}/{repo}/{name}")

        @self.app.get("/models/{model_id}/{slug}")
        def civitai_page(model_id: str, slug: str):
            return self._page(f"/models/{model_id}/{slug}", f"Hostile {model_id}")

        @self.app.get("/{owner}/{repo}")
        def hf_page(owner: str, repo: str):
            return self._page(f"/{owner}/{repo}", f"{owner}/{repo}")

    @property
    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]

    def _blob(self, key: str) -> Response:
        if key not in self.blobs:
            return JSONResponse({"error": "not found"}, 404)
        return Response(self.blobs[key], media_type="application/octet-stream")

    def _page(self, path: str, title: str) -> HTMLResponse:
        status, html = self.pages.get(path, (200, minimal_page(title)))
        return HTMLResponse(html, status_code=status)

    def civitai_page_path(self, model_id: int) -> str:
        return f"/models/{model_id}/{self.civitai_slug(model_id)}"

    def civitai_slug(self, model_id: int) -> str:
        model = next(m for m in self.civitai if isinstance(m, dict) and m.get("id") == model_id)
        import re

        return re.sub(r"[^a-z0-9]+", "-", str(model["name"]).lower()).strip("-") or "model"

    def publish_civitai(self, name: str, data: bytes, *, sha256: str | None = None, url: str | None = None,
                        base_model: str = "miniworld-sd", model_name: str | None = None, kind: str = "LORA",
                        trigger_words: list[str] | None = None, tags: list[str] | None = None,
                        description: str = "<p>A perfectly normal LoRA.</p>", page: str | None = None) -> int:
        """One model with one version and one file; returns its model id (catalog id civitai:<id>).
        ``url`` overrides the download URL (a redirect, another host), ``page`` the homepage."""
        key = str(len(self.blobs))
        self.blobs[key] = data
        model_id = 100 + len(self.civitai)
        self.civitai.append({
            "id": model_id, "name": model_name or f"Hostile {model_id}", "type": kind,
            "tags": ["texture"] if tags is None else tags, "description": description,
            "allowNoCredit": True, "allowCommercialUse": [], "allowDerivatives": True, "allowDifferentLicense": True,
            "modelVersions": [{
                "id": model_id * 10, "modelId": model_id, "name": "v1.0", "baseModel": base_model,
                "publishedAt": "2024-05-01T12:00:00.000Z",
                "trainedWords": ["hostile"] if trigger_words is None else trigger_words,
                "files": [{"id": model_id, "name": name, "sizeKB": len(data) / 1024, "type": "Model",
                           "metadata": {"format": "SafeTensor"}, "primary": True,
                           "hashes": {"SHA256": (sha256 or hashlib.sha256(data).hexdigest()).upper()},
                           "downloadUrl": url or f"{self.url}/files/{key}"}],
            }],
        })
        if page is not None:
            self.pages[self.civitai_page_path(model_id)] = (200, page)
        return model_id

    def publish_hf(self, repo_id: str, files: dict[str, bytes], *, base_model: str = "miniworld-sd",
                   sha256: dict[str, str] | None = None, page: str | None = None) -> None:
        """One repo at commit ``b`` * 40 with these files (``sha256`` overrides published hashes)."""
        for name, data in files.items():
            self.blobs[f"{repo_id}/{name}"] = data
        published = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        published.update(sha256 or {})
        self.hf[repo_id] = {
            "id": repo_id, "sha": "b" * 40, "lastModified": "2024-05-01T12:00:00.000Z",
            "tags": ["text-to-image", "lora", f"base_model:{base_model}"],
            "cardData": {"base_model": base_model, "tags": ["lora", "texture"], "instance_prompt": "hostile"},
            "siblings": [{"rfilename": name, "size": len(data), "lfs": {"sha256": published[name], "size": len(data)}}
                         for name, data in files.items()],
        }
        if page is not None:
            self.pages[f"/{repo_id}"] = (200, page)
