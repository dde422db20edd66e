"""Where ``wsiseg run`` writes: a local directory, or an fsspec URL such as ``s3://``.

A local directory (a path or a ``file://`` URL) is written in place, with atomic renames and
locks. An object store has neither, so a remote destination is written in two steps: each
slide runs into a local staging directory exactly as it would run locally, and only a slide
that finished is uploaded, its store's root ``zarr.json`` (the file that says "done") last
and an older store at the same place moved aside first. A remote slide is therefore either
complete or visibly not done; an upload cut short is redone by the next run. The driving
process keeps the ledger, ``summary.csv`` and ``report.html`` in a local mirror and uploads
each after it changes.

Credentials and endpoints come from fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL``,
``~/.config/fsspec/``) and the object store's (``AWS_PROFILE``, ``AWS_ENDPOINT_URL``, ...),
read by every worker from its own environment.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsiseg.errors import UsageError, WsisegError

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")

#: The file whose upload makes a remote slide store complete.
STORE_ROOT_META = "zarr.json"


@dataclass(frozen=True)
class Destination:
    """The ``--out`` of a run.

    Attributes
    ----------
    url : str
        As the user means it: a local path, or ``<protocol>://...`` for a remote one.
    local_dir : Path or None
        The directory itself for a local destination; None for a remote one.
    """

    url: str
    local_dir: Path | None

    @classmethod
    def parse(cls, out: str | Path) -> Destination:
        """A local path, a ``file://`` URL, or another fsspec URL (``s3://bucket/run``).

        ``Path("s3://x")`` collapses to ``s3:/x``; both spellings are accepted.

        Raises
        ------
        UsageError
            A ``file://`` URL naming another host.
        """
        text = str(out)
        match = _URL_SCHEME.match(text)
        if match is None:
            return cls(text, Path(text))
        scheme = match.group(1).lower()
        if scheme == "file":
            parsed = urllib.parse.urlparse(text)
            if parsed.netloc not in ("", "localhost"):
                raise UsageError(f"--out {text}: a file:// URL must name a local path "
                                 f"(host {parsed.netloc!r} given)")
            path = Path(urllib.parse.unquote(parsed.path))
            return cls(str(path), path)
        text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", r"\1://", text)  # Path ate a "/"
        return cls(text.rstrip("/"), None)

    @property
    def remote(self) -> bool:
        return self.local_dir is None

    # -- file operations (remote, or both where the docstring says so) ---------------------
    def filesystem(self) -> tuple[Any, str]:
        """The fsspec filesystem and the root path inside it (remote destinations).

        Raises
        ------
        WsisegError
            The protocol is unknown or its package (s3fs, gcsfs, ...) is not installed.
        """
        import fsspec.core

        try:
            return fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as exc:
            hint = " (pip install 'wsiseg[s3]')" if self.url.startswith("s3") else ""
            raise WsisegError(f"--out {self.url}: cannot use this URL: "
                              f"{str(exc).splitlines()[0]}{hint}") from None

    def join(self, name: str) -> str:
        """The remote path of ``name`` (``/``-separated, relative to the destination)."""
        _, root = self.filesystem()
        return f"{root.rstrip('/')}/{name}"

    def check_writable(self) -> None:
        """Write and remove a probe object; a one-line error names the URL and the reason."""
        fs, _ = self.filesystem()
        probe = self.join(f".wsiseg-probe-{uuid.uuid4().hex[:12]}")
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as exc:  # noqa: BLE001 - every backend raises its own types
            raise WsisegError(f"--out {self.url}: cannot write here "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0]})") from None

    def read_bytes(self, name: str) -> bytes | None:
        """The bytes of ``name`` (local or remote), or None when it does not exist."""
        if self.local_dir is not None:
            try:
                return (self.local_dir / name).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                return None
        fs, _ = self.filesystem()
        try:
            return fs.cat_file(self.join(name))
        except FileNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists there (local or remote)."""
        if self.local_dir is not None:
            return (self.local_dir / name).exists()
        fs, _ = self.filesystem()
        return bool(fs.exists(self.join(name)))

    def names(self) -> set[str]:
        """The names directly inside the destination (files and folders)."""
        if self.local_dir is not None:
            return {p.name for p in self.local_dir.iterdir()} if self.local_dir.is_dir() else set()
        fs, root = self.filesystem()
        fs.invalidate_cache()
        try:
            return {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)}
        except FileNotFoundError:
            return set()

    def download(self, name: str, local: Path) -> bool:
        """Copy ``name`` to the local file ``local`` when it exists; returns whether it did."""
        data = self.read_bytes(name)
        if data is None:
            return False
        local.write_bytes(data)
        return True

    def upload(self, local: Path, name: str) -> None:
        """Put one local file at ``name`` (a single object write: all of it or nothing)."""
        fs, _ = self.filesystem()
        fs.put_file(str(local), self.join(name))

    def upload_slide(self, staging: Path, slide_id: str) -> None:
        """Upload a finished slide's outputs from ``staging`` (a run's output directory).

        Every file goes up but ``<slide_id>.zarr/zarr.json``, which goes last: until it is
        there, the remote store is not a store and the slide is not done. A remote store
        already at that place is moved aside first (``.stale-<time>``), as locally, so no
        chunk of an older result can mix with the new one.
        """
        fs, _ = self.filesystem()
        store_name = f"{slide_id}.zarr"
        last = staging / store_name / STORE_ROOT_META
        files = [p for p in sorted(staging.rglob("*"))
                 if p.is_file() and p != last and not _hidden(p.relative_to(staging))]
        fs.invalidate_cache()
        if fs.exists(self.join(store_name)):
            stamp = time.strftime("%Y%m%d-%H%M%S")
            fs.mv(self.join(store_name), self.join(f"{store_name}.stale-{stamp}-"
                                                   f"{uuid.uuid4().hex[:4]}"), recursive=True)
        fs.put([str(p) for p in files],
               [self.join(p.relative_to(staging).as_posix()) for p in files])
        fs.put_file(str(last), self.join(f"{store_name}/{STORE_ROOT_META}"))

    def store_attrs(self, slide_id: str) -> dict[str, Any] | None:
        """The ``wsiseg`` attributes of the store ``<slide_id>.zarr`` (local or remote), or
        None (no store there, or not a wsiseg store)."""
        data = self.read_bytes(f"{slide_id}.zarr/{STORE_ROOT_META}")
        if data is None:
            return None
        try:
            attrs = json.loads(data)["attributes"]["wsiseg"]
        except (ValueError, KeyError, TypeError):
            return None
        return attrs if isinstance(attrs, dict) else None


def _hidden(relative: Path) -> bool:
    """Lock and temporary files (``.lock``, ``.name.xyz``) stay behind."""
    return any(part.startswith(".") for part in relative.parts)
