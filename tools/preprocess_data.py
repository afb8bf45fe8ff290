"""Tokenize a Hugging Face ``datasets`` source into a Megatron indexed dataset (.bin/.idx).

    .venv/bin/python tools/preprocess_data.py --input corpus.jsonl --tokenizer TOKENIZER_DIR \\
        --output-prefix data/my --append-eod
    .venv/bin/python tools/preprocess_data.py --input part-0.parquet part-1.parquet \\
        --tokenizer TOKENIZER_DIR --output-prefix data/my --text-key content --workers 8 \\
        --append-eod --vocab-size 129280 --skip-empty
    # writes data/my_text_document.bin/.idx (data/my_content_document.* for --text-key content)
    # and prints the value to pass to the launcher: --data-path data/my_text_document

Inputs (``--input``, one or more, read in the order given): .jsonl / .json (also .gz), .parquet and
.arrow files, or a directory written by ``datasets.Dataset.save_to_disk``. The tokenizer is a
local Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained(DIR,
local_files_only=True)``); nothing is fetched from a hub. Each document is tokenized with the
tokenizer's own special tokens (``tokenizer(text).input_ids``, as Megatron-LM's
``preprocess_data.py`` does for HuggingFaceTokenizer; ``--no-special-tokens`` turns them off),
then ``--append-eod`` appends the eos id. Token dtype: uint16 when ``len(tokenizer) < 65500``,
else int32 (Megatron-Core's ``DType.optimal_dtype``).

Guarantees: documents keep their input order, and the output is byte-identical for any
``--workers``. No document of length 0 is ever written (Megatron-Core 0.19.2's GPTDataset loops
forever in ``_get_num_epochs`` on a split whose documents hold 0 tokens, and an empty document
teaches nothing): empty / null texts and texts that tokenize to nothing are an error naming the
document, or, with ``--skip-empty``, dropped and counted. Files are written under
temporary names and renamed only when complete, the .idx last, so an interrupted run never leaves
a .bin/.idx pair that looks valid. Rewriting an existing pair also deletes the GPTDataset index
cache Megatron keeps next to it ({data-path}/cache/GPTDataset_indices, used when the launcher gets
no --data-cache-path): that cache is keyed by path, seed, split and sequence length, not by file
contents, so Megatron would otherwise read the new tokens through the old sample indices. Caches
under a --data-cache-path must be cleared by hand. Also importable: ``preprocess(...)`` and
``main(argv)``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import shutil
import sys
import time
from typing import Iterator, Optional, Sequence

ACCEPTED = ("a .jsonl/.json file (optionally .gz), a .parquet file, an .arrow file, or a directory "
            "written by datasets.Dataset.save_to_disk")
_EXT_KINDS = [(".jsonl.gz", "json"), (".json.gz", "json"), (".jsonl", "json"), (".json", "json"),
              (".parquet", "parquet"), (".arrow", "arrow")]
_SHOW = 5  # documents listed by name in an error message


class PreprocessError(ValueError):
    """A problem with the inputs or options; the message says what to change."""


@dataclasses.dataclass
class Source:
    path: str
    kind: str
    dataset: object  # datasets.Dataset
    first_index: int  # global index of this source's row 0


@dataclasses.dataclass
class PreprocessResult:
    data_path: str  # the --data-path value: prefix of the .bin/.idx pair
    bin_path: str
    idx_path: str
    n_docs: int  # documents written
    n_tokens: int  # tokens written (including EODs)
    n_skipped: int  # documents dropped by --skip-empty
    dtype: str
    vocab_size: int  # len(tokenizer)
    seconds: float


# --------------------------------------------------------------------------------------- inputs

def input_kind(path: str) -> str:
    """'json' | 'parquet' | 'arrow' | 'disk' for ``path``, or a PreprocessError naming it."""
    if not os.path.exists(path):
        raise PreprocessError(f"input {path!r} does not exist; --input takes {ACCEPTED}")
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f))
               for f in ("state.json", "dataset_dict.json", "dataset_info.json")):
            return "disk"
        raise PreprocessError(
            f"input {path!r} is a directory but not one written by Dataset.save_to_disk (no "
            f"state.json / dataset_dict.json in it); --input takes {ACCEPTED}")
    low = path.lower()
    for ext, kind in _EXT_KINDS:
        if low.endswith(ext):
            return kind
    raise PreprocessError(f"input {path!r} has an unknown extension; --input takes {ACCEPTED}")


def load_source(path: str, cache_dir: Optional[str] = None):
    """Load one input as a ``datasets.Dataset`` (the 'train' split for a saved DatasetDict)."""
    import datasets

    kind = input_kind(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise PreprocessError(f"input {path!r} is empty (0 bytes): it holds no documents; remove it from "
                              f"--input or fill it")
    try:
        if kind == "disk":
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                if "train" in ds:
                    ds = ds["train"]
                elif len(ds) == 1:
                    ds = next(iter(ds.values()))
                else:
                    raise PreprocessError(
                        f"input {path!r} is a DatasetDict with splits {sorted(ds)} and no 'train' "
                        f"split; save the split you want with Dataset.save_to_disk and pass that")
        else:
            ds = datasets.load_dataset(kind, data_files=[path], split="train", cache_dir=cache_dir)
    except PreprocessError:
        raise
    except Exception as e:  # a parse error, a corrupt file, ...
        if kind == "json" and _only_whitespace(path):   # (datasets says StopIteration or "no data")
            raise PreprocessError(f"input {path!r} holds only blank lines: it holds no documents; remove it "
                                  f"from --input or fill it") from e
        where = _first_non_utf8_line(path) if kind == "json" else None
        raise PreprocessError(f"could not read input {path!r} as {kind}"
                              + (f": {where}" if where else "") + f": {type(e).__name__}: {e}") from e
    return kind, ds


def _only_whitespace(path: str) -> bool:
    import gzip

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if chunk.strip():
                return False
    return True


def _first_non_utf8_line(path: str) -> Optional[str]:
    """'line N is not valid UTF-8 (...)' for the first such line of a (possibly gzipped) text file."""
    import gzip

    opener = gzip.open if path.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return (f"line {number} is not valid UTF-8 (byte {line[e.start]:#04x} at byte {e.start} of the "
                        f"line); re-encode the file as UTF-8")
    return None


def load_sources(paths: Sequence[str], cache_dir: Optional[str] = None) -> list[Source]:
    for p in paths:  # every path checked before any is loaded
        input_kind(p)
    sources, first = [], 0
    for p in paths:
        kind, ds = load_source(p, cache_dir)
        sources.append(Source(p, kind, ds, first))
        first += len(ds)
    return sources


def check_text_field(sources: Sequence[Source], text_key: str) -> None:
    import datasets

    for s in sources:
        cols = list(s.dataset.column_names)
        if text_key not in cols:
            raise PreprocessError(
                f"input {s.path!r} has no field {text_key!r} (its columns: {cols}); "
                f"pass the column that holds the text with --text-key")
        feat = s.dataset.features[text_key]
        if not (isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string")):
            raise PreprocessError(
                f"field {text_key!r} of input {s.path!r} is {feat}, not a string; pass the column "
                f"that holds the text with --text-key (columns: {cols})")


def _where(sources: Sequence[Source], index: int) -> str:
    for s in reversed(sources):
        if index >= s.first_index:
            return f"document {index} (row {index - s.first_index} of {s.path!r})"
    raise IndexError(index)


def find_empty(sources: Sequence[Source], text_key: str, batch_size: int = 65536) -> list[int]:
    """Global indices of documents whose text is null or ''. Also refuses text that is not valid
    UTF-8, naming the document."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = []
    for s in sources:
        ds = s.dataset.select_columns([text_key]).with_format("arrow")
        for start in range(0, len(ds), batch_size):
            col = ds[start:start + batch_size][text_key]
            try:
                col.validate(full=True)
            except pa.ArrowInvalid:
                _raise_non_utf8(sources, s, start, col, text_key)
            empty = pc.fill_null(pc.equal(pc.binary_length(col), 0), True)
            idx = pc.indices_nonzero(empty).to_numpy()
            out.extend(int(i) + start + s.first_index for i in idx)
    return out


def _raise_non_utf8(sources, source, start, col, text_key) -> None:
    import pyarrow as pa

    for i, raw in enumerate(col.cast(pa.large_binary()).to_pylist()):
        try:
            (raw or b"").decode("utf-8")
        except UnicodeDecodeError as e:
            raise PreprocessError(
                f"{_where(sources, source.first_index + start + i)}: its {text_key!r} is not valid UTF-8 "
                f"(byte {raw[e.start]:#04x} at byte {e.start}); re-encode the input as UTF-8") from None
    raise PreprocessError(f"input {source.path!r}: its {text_key!r} column is damaged (pyarrow validation "
                          f"failed on rows {start}..{start + len(col) - 1})")


# ------------------------------------------------------------------------------------ tokenizer

def load_tokenizer(tokenizer_dir: str):
    if not tokenizer_dir or not os.path.isdir(tokenizer_dir):
        raise PreprocessError(
            f"tokenizer directory {tokenizer_dir!r} does not exist; --tokenizer takes a local "
            f"Hugging Face tokenizer directory (one written by tokenizer.save_pretrained)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as e:
        raise PreprocessError(f"could not load a tokenizer from {tokenizer_dir!r} (--tokenizer): "
                              f"{type(e).__name__}: {e}") from e


def token_dtype(n_vocab: int):
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(n_vocab)


def check_tokenizer(tok, tokenizer_dir: str, append_eod: bool, vocab_size: Optional[int]) -> None:
    if append_eod and tok.eos_token_id is None:
        raise PreprocessError(
            f"--append-eod needs an eos token, and the tokenizer in {tokenizer_dir!r} has none; "
            f"set eos_token in its tokenizer_config.json or drop --append-eod")
    if vocab_size is not None and len(tok) > vocab_size:
        raise PreprocessError(
            f"the tokenizer in {tokenizer_dir!r} has {len(tok)} tokens (len(tokenizer)) but "
            f"--vocab-size is {vocab_size}: token ids could exceed the model's embedding table; "
            f"use a tokenizer that fits or raise --vocab-size to at least {len(tok)}")


_W: dict = {}  # per-process encoder state (the pool initializer fills it in workers)


def _init_encoder(tokenizer_dir, add_special_tokens, eod, dtype_name, tok=None) -> None:
    import numpy as np

    if tok is None:  # a pool worker: one tokenizer thread each, the processes are the parallelism
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(tok=tok if tok is not None else load_tokenizer(tokenizer_dir),
              add_special_tokens=add_special_tokens, eod=eod, dtype=np.dtype(dtype_name))


def _encode(item):
    """(meta, texts) -> (meta, lengths without EOD, flat token array with EODs)."""
    import numpy as np

    meta, texts = item
    if not texts:
        return meta, np.zeros(0, np.int64), np.zeros(0, _W["dtype"])
    ids = _W["tok"](texts, add_special_tokens=_W["add_special_tokens"], verbose=False)["input_ids"]
    lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
    eod = _W["eod"]
    if eod is not None:
        ids = [x + [eod] for x in ids]
    flat = np.fromiter((t for x in ids for t in x), _W["dtype"], int(lengths.sum()) + (
        len(ids) if eod is not None else 0))
    return meta, lengths, flat


def _batches(sources, text_key, batch_size, empty: set) -> Iterator:
    """Yields ((global indices of the texts sent, n rows covered), texts); empties left out."""
    for s in sources:
        ds = s.dataset.select_columns([text_key])
        for start in range(0, len(ds), batch_size):
            texts = ds[start:start + batch_size][text_key]
            first = s.first_index + start
            if empty:
                keep = [i for i in range(len(texts)) if first + i not in empty]
                yield ([first + i for i in keep], len(texts)), [texts[i] for i in keep]
            else:
                yield (range(first, first + len(texts)), len(texts)), texts


def _ordered(func, items, workers, initargs, tok):
    """map(func, items) in order, on ``workers`` processes with a bounded queue."""
    if workers <= 1:
        _init_encoder(*initargs, tok=tok)
        for it in items:
            yield func(it)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_encoder, initargs=initargs) as pool:
        pending = collections.deque()
        for it in items:
            pending.append(pool.apply_async(func, (it,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# --------------------------------------------------------------------------------------- output

def output_data_path(output_prefix: str, text_key: str) -> str:
    """Megatron-LM's naming: {prefix}_{text_key}_document."""
    return f"{output_prefix}_{text_key}_document"


def check_output(output_prefix: str, data_path: str) -> None:
    """The directory of ``data_path`` exists and is writable, or can be created (nothing is created
    here); a PreprocessError naming --output-prefix otherwise."""
    out_dir = os.path.dirname(os.path.abspath(data_path))
    for path in (data_path + ".bin", data_path + ".idx"):
        if os.path.isdir(path):
            raise PreprocessError(f"--output-prefix {output_prefix!r}: {path!r} is a directory")
    existing = out_dir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    why = None
    if not os.path.isdir(existing):
        why = f"{existing!r} is a file, not a directory"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing!r} is not writable"
    elif existing == out_dir:
        import tempfile

        try:
            with tempfile.TemporaryFile(dir=out_dir):
                pass
        except OSError as e:
            why = f"cannot create a file in {out_dir!r} ({e.strerror})"
    if why:
        raise PreprocessError(f"--output-prefix {output_prefix!r}: {why}; choose a writable directory")


def _remove_stale_index_cache(data_path: str, log) -> None:
    # With no --data-cache-path, GPTDataset caches its sample/shuffle indices in the directory
    # {data_path}/cache/GPTDataset_indices, keyed by path, seed, split and sequence length - not
    # by the file contents - so a rebuilt .bin/.idx would be read through the old indices.
    stale = os.path.join(data_path, "cache", "GPTDataset_indices")
    if os.path.isdir(stale):
        shutil.rmtree(stale)
        log(f"removed the stale GPTDataset index cache {stale} (Megatron rebuilds it)")


def preprocess(
    inputs: Sequence[str],
    tokenizer_dir: str,
    output_prefix: str,
    text_key: str = "text",
    workers: int = 1,
    append_eod: bool = False,
    vocab_size: Optional[int] = None,
    skip_empty: bool = False,
    add_special_tokens: bool = True,
    batch_size: int = 512,
    progress: bool = True,
    cache_dir: Optional[str] = None,
    log=print,
) -> PreprocessResult:
    """Tokenize ``inputs`` into ``{output_prefix}_{text_key}_document.{bin,idx}``.

    Raises PreprocessError (before writing anything where possible) on a bad input path, a missing
    text field, an empty document (unless ``skip_empty``), a missing tokenizer, a tokenizer with
    no eos under ``append_eod``, or ``len(tokenizer) > vocab_size``.
    """
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    t0 = time.perf_counter()
    if not inputs:
        raise PreprocessError(f"no --input given; --input takes {ACCEPTED}")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    for p in inputs:
        input_kind(p)
    check_output(output_prefix, output_data_path(output_prefix, text_key))
    tok = load_tokenizer(tokenizer_dir)
    check_tokenizer(tok, tokenizer_dir, append_eod, vocab_size)
    sources = load_sources(inputs, cache_dir)
    check_text_field(sources, text_key)
    n_rows = sum(len(s.dataset) for s in sources)
    if n_rows == 0:
        raise PreprocessError(f"the inputs {list(inputs)} hold no documents")

    empty = find_empty(sources, text_key)
    if empty and not skip_empty:
        names = "; ".join(_where(sources, i) for i in empty[:_SHOW])
        more = f" and {len(empty) - _SHOW} more" if len(empty) > _SHOW else ""
        raise PreprocessError(
            f"{len(empty)} document(s) have an empty or null {text_key!r}: {names}{more}. "
            f"Megatron cannot train on a 0-token document; remove them or pass --skip-empty to "
            f"drop them")

    dtype = token_dtype(len(tok))
    data_path = output_data_path(output_prefix, text_key)
    bin_path, idx_path = data_path + ".bin", data_path + ".idx"
    out_dir = os.path.dirname(os.path.abspath(data_path))
    os.makedirs(out_dir, exist_ok=True)
    tag = f".tmp-{os.getpid()}"
    tmp_bin, tmp_idx = bin_path + tag, idx_path + tag  # never named *.bin / *.idx

    eod = tok.eos_token_id if append_eod else None
    initargs = (tokenizer_dir, add_special_tokens, eod, np.dtype(dtype).name)
    skipped = list(empty)
    n_docs = n_tokens = 0
    bar = tqdm(total=n_rows, unit="doc", desc="tokenizing", disable=not progress,
               mininterval=0.5, file=sys.stderr)
    builder = None
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        items = _batches(sources, text_key, batch_size, set(empty))
        for (indices, rows), lengths, flat in _ordered(_encode, items, workers, initargs, tok):
            off = 0
            for gi, n in zip(indices, lengths.tolist()):
                size = n + (eod is not None)
                if n == 0:
                    if not skip_empty:
                        raise PreprocessError(
                            f"{_where(sources, gi)} tokenizes to 0 tokens. Megatron cannot train "
                            f"on a 0-token document; remove it or pass --skip-empty to drop such "
                            f"documents")
                    skipped.append(gi)
                else:
                    builder.add_document(flat[off:off + size], [size])
                    n_docs += 1
                    n_tokens += size
                off += size
            bar.update(rows)
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s",
                                refresh=False)
        bar.close()
        if n_docs == 0:
            raise PreprocessError("every document was empty; nothing to write")
        builder.finalize(tmp_idx)
        for p in (tmp_bin, tmp_idx):
            with open(p, "rb+") as f:
                os.fsync(f.fileno())
        # The .idx goes last: until it is in place there is no pair under the final names.
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    except BaseException as e:
        bar.close()
        if builder is not None and not builder.data_file.closed:
            builder.data_file.close()
        for p in (tmp_bin, tmp_idx):
            if os.path.exists(p):
                os.remove(p)
        if isinstance(e, OSError):   # disk full, a directory removed under us, ...
            raise PreprocessError(f"I/O error on {e.filename or data_path + '.bin/.idx'!r} while writing "
                                  f"{data_path}.bin/.idx: {e.strerror or e}; nothing was written") from e
        raise
    _remove_stale_index_cache(data_path, log)

    if skipped:
        skipped.sort()
        names = "; ".join(_where(sources, i) for i in skipped[:_SHOW])
        more = f" and {len(skipped) - _SHOW} more" if len(skipped) > _SHOW else ""
        log(f"--skip-empty: dropped {len(skipped)} empty document(s): {names}{more}")
    res = PreprocessResult(data_path=data_path, bin_path=bin_path, idx_path=idx_path,
                           n_docs=n_docs, n_tokens=n_tokens, n_skipped=len(skipped),
                           dtype=np.dtype(dtype).name, vocab_size=len(tok),
                           seconds=time.perf_counter() - t0)
    log(f"wrote {bin_path} and {idx_path}: {n_docs} documents, {n_tokens} tokens "
        f"({res.dtype}, tokenizer vocab {len(tok)}) in {res.seconds:.1f} s")
    log(f"pass to the launcher: --data-path {data_path}")
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH", help=ACCEPTED)
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="local Hugging Face tokenizer directory")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX_{text-key}_document.bin/.idx")
    p.add_argument("--text-key", default="text", help="the field that holds the document text (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default: 1)")
    p.add_argument("--append-eod", action="store_true",
                   help="append the tokenizer's eos id after every document")
    p.add_argument("--vocab-size", type=int, default=None, metavar="N",
                   help="the model's vocab size; error if len(tokenizer) exceeds it")
    p.add_argument("--skip-empty", action="store_true",
                   help="drop (and count) empty documents instead of failing")
    p.add_argument("--no-special-tokens", action="store_true",
                   help="tokenize with add_special_tokens=False (no BOS etc.)")
    p.add_argument("--batch-size", type=int, default=512, help="documents per tokenizer call (default: 512)")
    p.add_argument("--hf-cache-dir", default=None,
                   help="datasets cache for converted json/parquet inputs (default: HF's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        preprocess(
            inputs=args.input, tokenizer_dir=args.tokenizer, output_prefix=args.output_prefix,
            text_key=args.text_key, workers=args.workers, append_eod=args.append_eod,
            vocab_size=args.vocab_size, skip_empty=args.skip_empty,
            add_special_tokens=not args.no_special_tokens, batch_size=args.batch_size,
            progress=not args.no_progress, cache_dir=args.hf_cache_dir)
    except PreprocessError as e:
        print(f"preprocess_data.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
