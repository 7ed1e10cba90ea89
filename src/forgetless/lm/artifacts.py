"""Stage outputs: atomic writes and manifests that decide whether a cached output is still valid.

Every file is written to a temporary name in the same directory and renamed into place, so a
crash never leaves a half-written file that a later stage would take as complete. The manifest
is written last: an output directory without a manifest (or with a stale key) is never reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from forgetless.core.errors import DataError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_VERSIONED = ("forgetless", "torch", "transformers", "tokenizers", "peft", "trl", "datasets", "accelerate",
              "if-verifiable", "nltk")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp)`` a file at a temporary name beside ``path``, then rename it to ``path``: the one way an artifact
    file is written (the writers below are this for one format each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    write_atomic(path, lambda tmp: pq.write_table(table, tmp))


def write_npz(path: Path, arrays: dict) -> None:
    import numpy as np

    def save(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    write_atomic(path, save)


def write_dir(target: Path, fill: Callable[[Path], Any]) -> bool:
    """``fill(tmp)`` a new temporary folder beside ``target``, then rename it to ``target``, so that a folder found
    there is complete. When another process has put ``target`` there first, its folder is kept (False)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        fill(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # a folder is not renamed onto a full one: another process finished first
            return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # left only when not renamed
    return True


def read_parquet(path: str | Path, columns: list[str] | None = None):
    """A parquet table; a file that is not one is a :class:`DataError` naming it (not a pyarrow traceback)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: not a readable parquet table ({e})") from None


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def file_sha256(path: Path, length: int | None = None) -> str:
    """The sha256 (hex) of a file's bytes, read in chunks; its first ``length`` hex digits when given. The one file
    hash of forgetless: cache keys, stage stamps and the embedded model's fingerprint are made of it, so its values
    must never change (same algorithm, same bytes, same truncation)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:length]


def json_digest(data: Any, length: int, sort_keys: bool = False, default=None) -> str:
    """First ``length`` hex digits of the sha256 of ``json.dumps(data, sort_keys=sort_keys, default=default)``: a
    cache key made of settings. Its values are stored on disk (cache entries, stamps): never change how it
    serialises."""
    return hashlib.sha256(json.dumps(data, sort_keys=sort_keys, default=default).encode()).hexdigest()[:length]


def file_digest(path: Path) -> str | None:
    """First 16 hex digits of the sha256 of a file's bytes (None when it does not exist): a stage's stamp holds
    the digest of what it read, so that an input rewritten in place makes it run again."""
    return file_sha256(path, 16) if Path(path).is_file() else None


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def write_manifest(out_dir: Path, key: dict[str, Any] | None = None, config: Any = None, **fields: Any) -> None:
    """Write ``manifest.json`` last, marking the stage complete: the ``key`` that :func:`is_fresh` compares and the
    resolved ``config`` (both left out when ``key`` is None), the stage's own ``fields``, then the package
    :func:`versions` (unless ``fields`` holds the stage's own ``versions``)."""
    record = {} if key is None else {
        "key": key, "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config}
    record.update(fields)
    record.setdefault("versions", versions())
    write_json(Path(out_dir) / MANIFEST, record)


def is_fresh(out_dir: Path, key: dict[str, Any], *required: str) -> bool:
    """True when ``out_dir`` holds a complete output made from exactly ``key``; log why not otherwise."""
    manifest_path = Path(out_dir) / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        old = read_json(manifest_path).get("key", {})
    except (json.JSONDecodeError, OSError):
        logger.warning("ignoring unreadable %s", manifest_path)
        return False
    changed = stale_fields(old, key)
    if changed:
        logger.info("recomputing %s: %s changed", out_dir, ", ".join(changed))
        return False
    missing = [name for name in required if not (Path(out_dir) / name).is_file()]
    if missing:
        logger.info("recomputing %s: %s missing", out_dir, ", ".join(missing))
        return False
    return True


def as_json(data: Any) -> Any:
    """``data`` as it reads back from JSON (tuples become lists, paths strings), to compare with a stored copy."""
    return json.loads(json.dumps(data, default=_jsonable))


def stale_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the fields that differ between a stored key (read from JSON) and a new one."""
    new = as_json(new)
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):  # a config's Overrides section
        return dict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
