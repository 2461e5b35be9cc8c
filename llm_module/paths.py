"""Paths callers give, confined to the data root; atomic writes of files and folders.

Where llm_module keeps its own files is a setting (settings.Settings: ``home``, ``models_dir``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Forbidden, InvalidInput, NotFound


def resolve_user_path(path: str, data_root: Path | None, *, must_exist: bool, what: str) -> Path:
    """Turn a path from a caller into an absolute Path, confined to ``data_root`` when one is set.

    Relative paths are taken relative to the data root (or the working directory).
    Symlinks are resolved before the check, so a link pointing out is refused.
    """
    if not isinstance(path, str) or not path.strip():
        raise InvalidInput(f"{what} must be a non-empty path string, got {path!r}.")
    if "\x00" in path:
        raise InvalidInput(f"{what} contains a NUL byte; pass a plain file path.")
    try:
        raw = Path(path).expanduser()
    except RuntimeError:  # "~name" of no user: a plain name, as a shell leaves it
        raw = Path(path)
    if data_root is not None:
        root = data_root.resolve()
        candidate = (raw if raw.is_absolute() else root / raw).resolve()
        if candidate != root and root not in candidate.parents:
            raise Forbidden(
                f"{what} {path!r} is outside the data root {str(root)!r}; "
                "give a path inside it (relative paths are taken from the data root)."
            )
    else:
        candidate = raw.resolve()
    if must_exist and not _exists(candidate):
        raise NotFound(f"{what} {path!r} does not exist; check the path (resolved to {str(candidate)!r}).")
    return candidate


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system (ENAMETOOLONG), ...: no such file can exist
        return False


def _old_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.old")


def recover_dir(final: Path) -> None:
    """Finish or undo a swap that a crash interrupted: put the previous version back if ``final`` is gone."""
    old = _old_name(final)
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(old, final)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success it replaces ``final`` by rename.

    A crash or exception at any point leaves a loadable ``final``: the old one until the
    swap, the new one after; a crash inside the two-rename swap is undone by recover_dir.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = _old_name(final)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_tree(folder: Path) -> None:
    """Flush the files to disk before the rename makes them the live version."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file through a temporary name and rename, so readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
