"""Where a conversion writes while it runs, and how an interrupted one continues.

Everything goes into ``OUT.partial/``; only a finished conversion is renamed to ``OUT`` (so a
directory named ``OUT`` is always complete). Next to the files, a journal records the arguments and
source the conversion was started with (its fingerprint), then every finished item (which file, where
it ends, the chunk records it wrote). Data files are fsynced before the journal line that names them,
so the journal never claims bytes that are not on disk. A rerun with the same arguments reads the
journal, cuts each file back to the end of its last recorded item, re-hashes what it keeps, and goes
on from the next item: items are written in a fixed order, so the files come out byte for byte as an
uninterrupted run writes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time

from .hf_keys import HFCheckpointError

JOURNAL = ".dsv3-convert-journal.jsonl"
#: test hook: SIGKILL this process right after the data of this many items has been written (each
#: item is then committed on its own, so the journal holds the ones before it)
KILL_ENV = "DSV3_CONVERT_KILL_AFTER"
COMMIT_SECONDS = 5.0
COMMIT_BYTES = 1 << 30


class ConvertError(HFCheckpointError):
    """A conversion that cannot run or go on; the message names the tensor, file or flag."""


class OutFile:
    """One output file, appended to, hashed (SHA-256) as it is written."""

    def __init__(self, path: str, keep: int, hashed: bool):
        self.path = path
        exists = os.path.exists(path)
        if keep and (not exists or os.path.getsize(path) < keep):
            raise ConvertError(f"{path}: the journal records {keep} bytes written but the file "
                               f"{'is shorter' if exists else 'is gone'}; remove {os.path.dirname(path)} "
                               "and convert again")
        self.f = open(path, "r+b" if exists else "wb")
        self.f.truncate(keep)
        self.hash = hashlib.sha256() if hashed else None
        if self.hash is not None and keep:
            self.f.seek(0)
            left = keep
            while left:
                block = self.f.read(min(left, 16 << 20))
                self.hash.update(block)
                left -= len(block)
        self.f.seek(keep)
        self.pos = keep

    def write(self, data) -> int:
        n = self.f.write(data)
        if self.hash is not None:
            self.hash.update(data)
        self.pos += n
        return n

    def flush(self) -> None:
        self.f.flush()

    def sync(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> dict:
        self.sync()
        self.f.close()
        return {"size": self.pos, "sha256": self.hash.hexdigest() if self.hash is not None else None}


class Staging:
    """The ``OUT.partial`` directory of one conversion (new, or continued from its journal)."""

    def __init__(self, out: str, fingerprint: dict, flag: str = "--out"):
        self.out = os.path.abspath(out)
        self.tmp = self.out.rstrip(os.sep) + ".partial"
        self.fingerprint = json.loads(json.dumps(fingerprint))
        if os.path.exists(self.out):
            raise ConvertError(f"{flag} {out} already exists; the converter never writes over a directory. "
                               "Remove it or choose another")
        self.items: list[dict] = []         # committed item records, in item order
        self.done_files: dict[str, dict] = {}
        journal = os.path.join(self.tmp, JOURNAL)
        self.resumed = os.path.isdir(self.tmp)
        if self.resumed:
            self._read_journal(journal)
        else:
            os.makedirs(self.tmp)
            with open(journal, "w") as f:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self._journal = open(journal, "a")
        self._pending: list[dict] = []
        self._files: dict[str, OutFile] = {}
        self._last_commit, self._bytes = time.monotonic(), 0
        kill = os.environ.get(KILL_ENV)
        self._kill_after = int(kill) if kill else None
        self._written = 0

    def _read_journal(self, journal: str) -> None:
        if not os.path.exists(journal):
            raise ConvertError(f"{self.tmp} exists but holds no journal ({JOURNAL}): it is not an "
                               "interrupted conversion of this tool; remove it")
        with open(journal) as f:
            lines = f.read().split("\n")
        try:
            head = json.loads(lines[0])["fingerprint"]
        except (ValueError, KeyError, IndexError):
            raise ConvertError(f"{journal} is damaged; remove {self.tmp} and convert again") from None
        if head != self.fingerprint:
            diff = sorted(k for k in set(head) | set(self.fingerprint) if head.get(k) != self.fingerprint.get(k))
            raise ConvertError(f"{self.tmp} holds an interrupted conversion started with other arguments or "
                               f"from another source (differs in: {', '.join(diff)}); rerun it with the same "
                               f"arguments to continue it, or remove {self.tmp}")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                break                   # a line cut short by the interruption (never committed)
            if "file_done" in rec:
                self.done_files[rec["file_done"]] = rec["info"]
            else:
                if rec["item"] != len(self.items):
                    raise ConvertError(f"{journal} is out of order; remove {self.tmp} and convert again")
                self.items.append(rec)

    # ------------------------------------------------------------------
    @property
    def committed(self) -> int:
        """How many items are done (they are done in order)."""
        return len(self.items)

    def path(self, rel: str) -> str:
        return os.path.join(self.tmp, rel)

    def file(self, rel: str, hashed: bool = False) -> OutFile:
        """The open output file ``rel`` (cut back to its last committed item when continuing)."""
        if rel not in self._files:
            keep = max((r["end"] for r in self.items if r.get("file") == rel), default=0)
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)
            self._files[rel] = OutFile(self.path(rel), keep, hashed)
        return self._files[rel]

    def close_file(self, rel: str) -> dict:
        """Close a finished file: its size and hash, recorded in the journal."""
        if rel in self.done_files:
            return self.done_files[rel]
        info = self.file(rel).close()
        del self._files[rel]
        self.done_files[rel] = info
        self._pending.append({"file_done": rel, "info": info})
        self.commit()
        return info

    def item_done(self, record: dict, nbytes: int = 0) -> None:
        """Item ``record['item']`` is written (its bytes may still be in the OS buffers)."""
        self._written += 1
        if self._kill_after is not None and self._written >= self._kill_after:
            for f in self._files.values():
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        self._pending.append(record)
        self.items.append(record)
        self._bytes += nbytes
        if (self._kill_after is not None or self._bytes >= COMMIT_BYTES
                or time.monotonic() - self._last_commit >= COMMIT_SECONDS):
            self.commit()

    def commit(self) -> None:
        """fsync the data, then journal the items it holds."""
        for f in self._files.values():
            f.sync()
        for rec in self._pending:
            self._journal.write(json.dumps(rec) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())
        self._pending.clear()
        self._last_commit, self._bytes = time.monotonic(), 0

    def finish(self) -> str:
        """Everything is written: drop the journal and rename ``OUT.partial`` to ``OUT``."""
        for rel in list(self._files):
            self.close_file(rel)
        self.commit()
        self._journal.close()
        os.remove(os.path.join(self.tmp, JOURNAL))
        _fsync_dir(self.tmp)
        os.rename(self.tmp, self.out)
        _fsync_dir(os.path.dirname(self.out))
        return self.out

    def abandon(self) -> None:
        """Stop after an error: flush what was written (a rerun continues from the journal)."""
        try:
            self.commit()
        finally:
            for f in self._files.values():
                f.f.close()
            self._files.clear()
            self._journal.close()


def write_small(path: str, data: bytes) -> dict:
    """Write a small file atomically (temporary name, fsync, rename); returns its size and hash."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
