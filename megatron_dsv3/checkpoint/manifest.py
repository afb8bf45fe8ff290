"""Checkpoint manifests: the size and SHA-256 of every file of one checkpoint iteration directory.

torch's checkpoint formats carry no checksums: a shard with a few KiB of finite garbage loads without
a word. The launcher writes ``dsv3_manifest.json`` into each iteration directory once every shard
is complete and before Megatron points ``latest_checkpointed_iteration.txt`` at it, and checks it
before Megatron reads anything at load (both spread over the ranks by
:mod:`megatron_dsv3.training.safety`). This module is the single-process part, standard library only:

    python -m megatron_dsv3.checkpoint.manifest verify CKPT/iter_0000100
    python -m megatron_dsv3.checkpoint.manifest write  CKPT/iter_0000100   # a checkpoint you trust,
                                                                          # saved without a manifest

Manifest format (JSON): ``{"format": "megatron-dsv3 checkpoint manifest", "version": 1,
"algorithm": "sha256", "files": {relative path: {"size": bytes, "sha256": hex}}}``; the manifest does
not list itself. It is written to a temporary file, fsynced and renamed into place, so it either
exists complete or not at all.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Iterable, Optional

MANIFEST_NAME = "dsv3_manifest.json"
FORMAT = "megatron-dsv3 checkpoint manifest"
VERSION = 1
ALGORITHM = "sha256"
_CHUNK = 4 << 20
_TMP_SUFFIX = ".tmp"


class ManifestError(Exception):
    """A manifest that cannot be read (missing, unreadable, not ours)."""


@dataclass(frozen=True)
class Problem:
    """One file of a checkpoint that does not match its manifest."""

    path: str        # relative to the checkpoint directory
    what: str        # 'missing' | 'size' | 'content' | 'unlisted' | 'unreadable'
    detail: str

    def describe(self, ckpt_dir: str) -> str:
        return f"{os.path.join(ckpt_dir, self.path)}: {self.detail}"


def manifest_path(ckpt_dir: str) -> str:
    return os.path.join(ckpt_dir, MANIFEST_NAME)


def hash_file(path: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of one file, read in 4 MiB chunks."""
    digest = hashlib.new(ALGORITHM)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            chunk = f.read(_CHUNK)
            if not chunk:
                break
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def list_files(ckpt_dir: str) -> list[str]:
    """Every regular file below ``ckpt_dir`` (relative paths, sorted), except the manifest itself."""
    out = []
    for dirpath, dirnames, files in os.walk(ckpt_dir):
        dirnames.sort()
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), ckpt_dir)
            if rel in (MANIFEST_NAME, MANIFEST_NAME + _TMP_SUFFIX):
                continue
            out.append(rel)
    return sorted(out)


def hash_files(ckpt_dir: str, rels: Iterable[str]) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} for the given files."""
    return {rel: dict(zip(("size", ALGORITHM), hash_file(os.path.join(ckpt_dir, rel)))) for rel in rels}


def write_manifest(ckpt_dir: str, entries: dict[str, dict]) -> str:
    """Write the manifest atomically (temporary file, fsync, rename, fsync of the directory)."""
    payload = {"format": FORMAT, "version": VERSION, "algorithm": ALGORITHM,
               "files": {k: entries[k] for k in sorted(entries)}}
    final = manifest_path(ckpt_dir)
    tmp = final + _TMP_SUFFIX
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fd = os.open(ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return final


def read_manifest(ckpt_dir: str) -> dict[str, dict]:
    """The manifest's {relative path: {"size", "sha256"}}; ManifestError naming the file otherwise."""
    path = manifest_path(ckpt_dir)
    if not os.path.isfile(path):
        raise ManifestError(f"{path} does not exist: the checkpoint was not completed by megatron-dsv3 "
                            "(a save that never finished, or another tool)")
    try:
        with open(path) as f:
            payload = json.load(f)
    except (OSError, ValueError) as e:
        raise ManifestError(f"{path} cannot be read: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("files"), dict):
        raise ManifestError(f"{path} is not a megatron-dsv3 checkpoint manifest")
    if payload.get("algorithm") != ALGORITHM or payload.get("version") != VERSION:
        raise ManifestError(f"{path}: unsupported manifest (version {payload.get('version')}, "
                            f"algorithm {payload.get('algorithm')})")
    return payload["files"]


def check_files(ckpt_dir: str, entries: dict[str, dict], rels: Iterable[str]) -> tuple[list[Problem], int]:
    """Check the given listed files against their entries: (problems, bytes hashed)."""
    problems, hashed = [], 0
    for rel in rels:
        want = entries[rel]
        path = os.path.join(ckpt_dir, rel)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            problems.append(Problem(rel, "missing", "missing (listed in the manifest)"))
            continue
        except OSError as e:
            problems.append(Problem(rel, "unreadable", f"cannot be read: {e}"))
            continue
        if size != want["size"]:
            why = "truncated" if size < want["size"] else "larger than written"
            problems.append(Problem(rel, "size", f"{why}: {size} bytes, the manifest says {want['size']}"))
            continue
        try:
            _, digest = hash_file(path)
        except OSError as e:
            problems.append(Problem(rel, "unreadable", f"cannot be read: {e}"))
            continue
        hashed += size
        if digest != want[ALGORITHM]:
            problems.append(Problem(rel, "content", f"content changed since it was saved ({ALGORITHM} "
                                                    f"{digest[:12]}..., the manifest says {want[ALGORITHM][:12]}...)"))
    return problems, hashed


def unlisted_files(ckpt_dir: str, entries: dict[str, dict]) -> list[Problem]:
    """Files in the directory that the manifest does not list (added after the save)."""
    return [Problem(rel, "unlisted", "not in the manifest (added after the checkpoint was saved)")
            for rel in list_files(ckpt_dir) if rel not in entries]


def verify(ckpt_dir: str, part: Optional[tuple[int, int]] = None) -> tuple[list[Problem], int]:
    """Check a checkpoint against its manifest in one process (``part=(i, n)``: only every n-th
    listed file from the i-th; the unlisted-file check runs in part 0). Raises ManifestError."""
    entries = read_manifest(ckpt_dir)
    i, n = part or (0, 1)
    problems, hashed = check_files(ckpt_dir, entries, sorted(entries)[i::n])
    if i == 0:
        problems += unlisted_files(ckpt_dir, entries)
    return problems, hashed


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] not in ("write", "verify"):
        print("usage: python -m megatron_dsv3.checkpoint.manifest write|verify CKPT_DIR/iter_NNNNNNN",
              file=sys.stderr)
        return 2
    action, ckpt_dir = argv
    if not os.path.isdir(ckpt_dir):
        print(f"error: {ckpt_dir} is not a directory", file=sys.stderr)
        return 1
    start = time.perf_counter()
    if action == "write":
        entries = hash_files(ckpt_dir, list_files(ckpt_dir))
        path = write_manifest(ckpt_dir, entries)
        total = sum(e["size"] for e in entries.values())
        print(f"wrote {path}: {len(entries)} files, {total} bytes hashed in {time.perf_counter() - start:.2f} s")
        return 0
    try:
        problems, hashed = verify(ckpt_dir)
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"error: {p.describe(ckpt_dir)}", file=sys.stderr)
    if not problems:
        print(f"{ckpt_dir}: every file matches its manifest ({hashed} bytes hashed in "
              f"{time.perf_counter() - start:.2f} s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
