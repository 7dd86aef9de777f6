"""Where converted models live, and how a finished conversion is recognised."""

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from refreekv_vllm import envs

MANIFEST = "refreekv_manifest.json"


def model_cache_dir() -> Path:
    """``$REFREEKV_CACHE_DIR`` or ``~/.cache/refreekv_vllm``."""
    root = envs.REFREEKV_CACHE_DIR or os.path.join(
        os.path.expanduser("~"), ".cache", "refreekv_vllm")
    return Path(root)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(out_dir: Path, source: dict) -> None:
    """Record the sha256 of every file so a later run can verify the directory."""
    files = {p.name: sha256_file(p) for p in sorted(out_dir.iterdir()) if p.name != MANIFEST}
    with open(out_dir / MANIFEST, "w") as f:
        json.dump({"source": source, "files": files}, f, indent=2)


def verified(out_dir: Path, source: dict) -> bool:
    """True when ``out_dir`` holds a finished conversion of ``source`` whose files are intact."""
    manifest_path = out_dir / MANIFEST
    if not manifest_path.is_file():
        return False
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("source") != source:
        return False
    for name, digest in manifest["files"].items():
        path = out_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def build_once(out_dir: Path, source: dict, build: Callable[[Path], None]) -> Path:
    """Return ``out_dir`` if it already holds a verified build of ``source``; otherwise run
    ``build`` into a scratch directory and move it into place only once it finished."""
    if verified(out_dir, source):
        return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    build(partial)
    write_manifest(partial, source)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir
