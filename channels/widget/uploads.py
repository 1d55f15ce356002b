"""Image attachments: bounded upload, type checked by magic bytes (never by the name or the
declared type), stored on disk under a random name, served back to the pages.

A new upload waits in `pending/` until a message attaches it (then it moves up into the
directory itself); pending files older than the orphan age are deleted by `sweep`, so
uploads nobody sends cannot fill the disk."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

from channels.http import ApiError

# (kind, extension, MIME type) by leading bytes.
_MIME = {"png": "image/png", "jpeg": "image/jpeg", "gif": "image/gif", "webp": "image/webp"}
_EXT = {"png": "png", "jpeg": "jpg", "gif": "gif", "webp": "webp"}
_KIND_OF_EXT = {v: k for k, v in _EXT.items()}
_NAME_RE = re.compile(r"^[0-9a-f]{32}\.(png|jpg|gif|webp)$")
FILES_PATH = "/widget/v1/files"


def sniff(head: bytes) -> str | None:
    """The image kind the bytes really are, or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


class Uploads:
    def __init__(self, directory: str, max_bytes: int, kinds: list[str]) -> None:
        self.dir = Path(directory)
        self.pending = self.dir / "pending"
        self.max_bytes = max_bytes
        self.kinds = set(kinds)

    async def receive(self, request: web.Request, max_bytes: int | None = None) -> dict[str, Any]:
        """Read the request body (the raw image) within the limit (and `max_bytes`, what the
        uploader's quota has left), check and store it as pending."""
        limit = self.max_bytes if max_bytes is None else min(max_bytes, self.max_bytes)
        declared = request.content_length
        if declared is not None and declared > limit:
            raise self._too_large() if limit == self.max_bytes else self._over_quota()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise self._too_large() if limit == self.max_bytes else self._over_quota()
            chunks.append(chunk)
        if size == 0:
            raise ApiError(400, "empty_file", "send the image bytes as the request body")
        data = b"".join(chunks)
        kind = sniff(data[:16])
        if kind is None or kind not in self.kinds:
            allowed = ", ".join(sorted(self.kinds))
            raise ApiError(
                415,
                "unsupported_type",
                f"the file is not an image of an accepted type ({allowed})",
            )
        name = f"{uuid.uuid4().hex}.{_EXT[kind]}"
        await asyncio.to_thread(self._write, name, data)
        return self.describe(name, size)

    def _write(self, name: str, data: bytes) -> None:
        # Made on the first upload, not at start: a service that never gets one leaves no dir.
        self.pending.mkdir(parents=True, exist_ok=True)
        (self.pending / name).write_bytes(data)

    def _over_quota(self) -> ApiError:
        return ApiError(
            429, "upload_quota", "too many images uploaded today; send text, or try tomorrow"
        )

    async def attach(self, name: str) -> None:
        """A message refers to the upload: keep it (out of the orphans' way)."""
        await asyncio.to_thread(self._attach, name)

    def _attach(self, name: str) -> None:
        try:
            os.replace(self.pending / name, self.dir / name)
        except FileNotFoundError:
            pass  # attached before (a resend), or swept meanwhile: lookup said which

    async def sweep(self, older_than_s: float) -> int:
        """Delete pending uploads older than `older_than_s`; how many went."""
        return await asyncio.to_thread(self._sweep, time.time() - older_than_s)

    def _sweep(self, cutoff: float) -> int:
        removed = 0
        try:
            entries = list(os.scandir(self.pending))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if entry.is_file() and entry.stat().st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue  # attached meanwhile
        return removed

    def _path(self, name: str) -> Path | None:
        for path in (self.dir / name, self.pending / name):
            if path.is_file():
                return path
        return None

    def _too_large(self) -> ApiError:
        mb = self.max_bytes / 2**20
        return ApiError(
            413, "file_too_large", f"images may be at most {mb:g} MB; send a smaller one"
        )

    def describe(self, name: str, size: int) -> dict[str, Any]:
        kind = _KIND_OF_EXT[name.rsplit(".", 1)[1]]
        return {
            "type": "image",
            "id": name,
            "url": f"{FILES_PATH}/{name}",
            "mime": _MIME[kind],
            "size": size,
        }

    async def lookup(self, name: object) -> dict[str, Any] | None:
        """The attachment record of an upload named by a client, if it exists."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            return None
        path = await asyncio.to_thread(self._path, name)
        if path is None:
            return None
        try:
            stat = await asyncio.to_thread(path.stat)
        except OSError:
            return None
        return self.describe(name, stat.st_size)

    async def serve(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = await asyncio.to_thread(self._path, name) if _NAME_RE.match(name) else None
        if path is None:
            raise ApiError(404, "not_found", "no such file")
        kind = _KIND_OF_EXT[name.rsplit(".", 1)[1]]
        return web.FileResponse(
            path,
            headers={
                "Content-Type": _MIME[kind],
                "Cache-Control": "private, max-age=31536000, immutable",
                "X-Content-Type-Options": "nosniff",
                "Content-Security-Policy": "default-src 'none'",
                "Cross-Origin-Resource-Policy": "cross-origin",
            },
        )
