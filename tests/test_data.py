"""Data pipeline: tools/preprocess_data.py (HF datasets -> Megatron .bin/.idx) and
tools/make_quickstart_data.py, read back through Megatron-Core's IndexedDataset, tokenizer builder
and GPTDataset (via BlendedMegatronDatasetBuilder)."""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import make_quickstart_data as mq  # noqa: E402
import preprocess_data as pp  # noqa: E402

EXTRA = ["naïve café — 東京 🚀 ünïcödé", "line one\nline two\n\n\ttabbed", "x", " leading space"]


@pytest.fixture(scope="module")
def docs():
    return mq.make_corpus(n_docs=150, seed=7) + EXTRA


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, docs):
    d = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    mq.train_tokenizer(docs, d, vocab_size=320)
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)


def _jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, docs):
    return _jsonl(tmp_path_factory.mktemp("corpus") / "corpus.jsonl", [{"text": t, "id": i} for i, t in enumerate(docs)])


def _run(tmp_path, inputs, tok_dir, name="out", **kw):
    kw.setdefault("progress", False)
    kw.setdefault("cache_dir", str(tmp_path / "hf_cache"))
    kw.setdefault("log", lambda *a: None)
    return pp.preprocess(inputs=inputs, tokenizer_dir=tok_dir, output_prefix=str(tmp_path / name), **kw)


def _bytes(res):
    with open(res.bin_path, "rb") as b, open(res.idx_path, "rb") as i:
        return b.read(), i.read()


def _outputs(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def test_round_trip(tmp_path, corpus, docs, tok, tok_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    res = _run(tmp_path, [corpus], tok_dir, append_eod=True)
    assert res.data_path == str(tmp_path / "out_text_document")
    assert _outputs(tmp_path) == ["out_text_document.bin", "out_text_document.idx"]  # no temp files left
    ds = IndexedDataset(res.data_path)
    assert len(ds) == len(docs) == res.n_docs and res.n_skipped == 0 and ds.index.dtype == np.uint16
    assert list(ds.document_indices) == list(range(len(docs) + 1))
    eos = tok.eos_token_id
    for i, text in enumerate(docs):
        want = tok(text).input_ids + [eos]
        assert ds[i].tolist() == want, i
        assert tok.decode(want[:-1]) == text
    assert res.n_tokens == int(ds.sequence_lengths.sum())

    # Keep the IndexedDataset alive while reading: its __del__ closes the mmap under the arrays it
    # handed out (reading one afterwards segfaults).
    plain = IndexedDataset(_run(tmp_path, [corpus], tok_dir, name="plain").data_path)
    assert [plain[i].tolist() for i in range(3)] == [tok(t).input_ids for t in docs[:3]]


def test_cli_and_workers_byte_identical(tmp_path, corpus, tok_dir, capsys):
    one = _run(tmp_path, [corpus], tok_dir, name="w1", append_eod=True, batch_size=16)
    # several batches in flight on two processes must come back in order
    rc = pp.main(["--input", corpus, "--tokenizer", tok_dir, "--output-prefix", str(tmp_path / "w2"), "--workers", "2",
                  "--append-eod", "--batch-size", "7", "--no-progress", "--hf-cache-dir", str(tmp_path / "c")])
    assert rc == 0
    assert f"--data-path {tmp_path / 'w2'}_text_document" in capsys.readouterr().out
    two = pp.PreprocessResult(str(tmp_path / "w2_text_document"), str(tmp_path / "w2_text_document.bin"),
                              str(tmp_path / "w2_text_document.idx"), 0, 0, 0, "", 0, 0.0)
    assert _bytes(one) == _bytes(two)


def test_input_formats_give_identical_output(tmp_path, corpus, docs, tok_dir):
    import datasets

    ds = datasets.Dataset.from_list([{"id": i, "text": t} for i, t in enumerate(docs)])
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    arrow = [f for f in os.listdir(tmp_path / "saved") if f.endswith(".arrow")]
    assert len(arrow) == 1
    with open(tmp_path / "c.json", "w", encoding="utf-8") as f:
        json.dump([{"text": t} for t in docs], f)
    half = len(docs) // 2
    a = _jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs[:half]])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": t} for t in docs[half:]])
    inputs = {"jsonl": [corpus], "parquet": [str(tmp_path / "c.parquet")], "disk": [str(tmp_path / "saved")],
              "arrow": [str(tmp_path / "saved" / arrow[0])], "json": [str(tmp_path / "c.json")], "two_files": [a, b]}
    out = {k: _bytes(_run(tmp_path, v, tok_dir, name=f"o_{k}", append_eod=True)) for k, v in inputs.items()}
    for k, v in out.items():
        assert v == out["jsonl"], k


def test_missing_text_field(tmp_path, tok_dir):
    src = _jsonl(tmp_path / "c.jsonl", [{"content": "hello there", "meta": 1}])
    with pytest.raises(pp.PreprocessError) as e:
        _run(tmp_path, [src], tok_dir)
    msg = str(e.value)
    assert "'text'" in msg and "'content'" in msg and "'meta'" in msg and "--text-key" in msg and "c.jsonl" in msg
    assert _outputs(tmp_path) == []
    res = _run(tmp_path, [src], tok_dir, text_key="content")
    assert res.data_path.endswith("out_content_document") and res.n_docs == 1


def test_empty_document_is_an_error_before_writing(tmp_path, tok_dir):
    first = _jsonl(tmp_path / "first.jsonl", [{"text": "Ada finds a ball."}] * 2)
    second = _jsonl(tmp_path / "second.jsonl", [{"text": "x"}, {"text": ""}, {"text": "y"}])
    with pytest.raises(pp.PreprocessError) as e:
        _run(tmp_path, [first, second], tok_dir, append_eod=True)
    msg = str(e.value)
    assert "document 3 (row 1 of" in msg and "second.jsonl" in msg and "--skip-empty" in msg
    assert _outputs(tmp_path) == []


def test_skip_empty_drops_and_reports(tmp_path, tok_dir, tok, capsys):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = _jsonl(tmp_path / "c.jsonl", [{"text": "Ada finds a ball."}, {"text": ""}, {"text": None},
                                        {"text": "Ben sees a cup."}])
    rc = pp.main(["--input", src, "--tokenizer", tok_dir, "--output-prefix", str(tmp_path / "out"), "--append-eod",
                  "--skip-empty", "--no-progress", "--hf-cache-dir", str(tmp_path / "c")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "dropped 2 empty document(s)" in printed and "document 1 " in printed and "document 2 " in printed
    ds = IndexedDataset(str(tmp_path / "out_text_document"))
    eos = tok.eos_token_id
    assert [ds[i].tolist() for i in range(len(ds))] == [tok("Ada finds a ball.").input_ids + [eos],
                                                        tok("Ben sees a cup.").input_ids + [eos]]


def test_document_tokenizing_to_nothing(tmp_path, tok_dir):
    # A tokenizer whose normalizer deletes "~": "~~~" is non-empty text but 0 tokens.
    from tokenizers import Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    t.normalizer = normalizers.Replace("~", "")
    strip_dir = str(tmp_path / "strip_tok")
    PreTrainedTokenizerFast(tokenizer_object=t, eos_token=mq.EOS_TOKEN).save_pretrained(strip_dir)
    src = _jsonl(tmp_path / "c.jsonl", [{"text": "Ada finds a ball."}, {"text": "~~~"}, {"text": "Ben."}])
    with pytest.raises(pp.PreprocessError) as e:
        _run(tmp_path, [src], strip_dir, append_eod=True)
    assert "document 1 (row 1 of" in str(e.value) and "0 tokens" in str(e.value) and "--skip-empty" in str(e.value)
    assert _outputs(tmp_path) == []  # the temporary files were removed
    res = _run(tmp_path, [src], strip_dir, append_eod=True, skip_empty=True)
    assert (res.n_docs, res.n_skipped) == (2, 1)


def test_vocab_size_and_eos_checks(tmp_path, corpus, tok_dir):
    with pytest.raises(pp.PreprocessError) as e:
        _run(tmp_path, [corpus], tok_dir, vocab_size=300)
    assert "320" in str(e.value) and "300" in str(e.value) and "--vocab-size" in str(e.value)
    assert _run(tmp_path, [corpus], tok_dir, vocab_size=320).vocab_size == 320

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    no_eos = str(tmp_path / "no_eos")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))).save_pretrained(no_eos)
    with pytest.raises(pp.PreprocessError, match="--append-eod needs an eos token"):
        _run(tmp_path, [corpus], no_eos, name="x", append_eod=True)


def test_bad_paths(tmp_path, corpus, tok_dir, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "plain_dir").mkdir()
    cases = [(str(tmp_path / "missing.jsonl"), "does not exist"), (str(tmp_path / "notes.txt"), "unknown extension"),
             (str(tmp_path / "plain_dir"), "not one written by Dataset.save_to_disk")]
    for path, why in cases:
        with pytest.raises(pp.PreprocessError) as e:
            _run(tmp_path, [corpus, path], tok_dir)
        assert path in str(e.value) and why in str(e.value) and ".parquet" in str(e.value) and "save_to_disk" in str(e.value)
    with pytest.raises(pp.PreprocessError, match="tokenizer directory .*no_such_tok.* does not exist"):
        _run(tmp_path, [corpus], str(tmp_path / "no_such_tok"))
    assert pp.main(["--input", cases[1][0], "--tokenizer", tok_dir, "--output-prefix", str(tmp_path / "out")]) == 2
    assert "unknown extension" in capsys.readouterr().err
    assert _outputs(tmp_path) == []


def test_interrupted_run_keeps_the_old_pair_and_leaves_no_new_one(tmp_path, corpus, tok_dir, monkeypatch):
    good = _bytes(_run(tmp_path, [corpus], tok_dir, append_eod=True))
    real, calls = pp._encode, []

    def dies_on_second_batch(item):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(item)

    monkeypatch.setattr(pp, "_encode", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, [corpus], tok_dir, append_eod=True, batch_size=8)
    assert _outputs(tmp_path) == ["out_text_document.bin", "out_text_document.idx"]
    assert _bytes(pp.PreprocessResult(str(tmp_path / "out_text_document"), str(tmp_path / "out_text_document.bin"),
                                      str(tmp_path / "out_text_document.idx"), 0, 0, 0, "", 0, 0.0)) == good


def test_rewrite_removes_megatrons_stale_index_cache(tmp_path, corpus, tok_dir):
    # GPTDataset's default cache ({data_path}/cache/GPTDataset_indices) is keyed by path, not content.
    stale = tmp_path / "out_text_document" / "cache" / "GPTDataset_indices"
    stale.mkdir(parents=True)
    (stale / "x-GPTDataset-train-sample_index.npy").write_bytes(b"old")
    _run(tmp_path, [corpus], tok_dir)
    assert not stale.exists()


def _megatron_tokenizer(tok_dir, tp=1):
    """What megatron.training builds for --tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

    args = argparse.Namespace(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tok_dir, chat_template=None, vocab_file=None,
        merge_file=None, special_tokens=None, tokenizer_hf_no_use_fast=False, trust_remote_code=False,
        tokenizer_hf_no_include_special_tokens=False, metadata_path=None, pad_vocab_size=True,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=tp, rank=0)
    return build_tokenizer(args), args.padded_vocab_size


def test_gpt_dataset_reads_the_output(tmp_path, corpus, docs, tok, tok_dir):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    res = _run(tmp_path, [corpus], tok_dir, append_eod=True)
    mtok, padded = _megatron_tokenizer(tok_dir)
    assert (mtok.vocab_size, mtok.eod, mtok.pad, padded) == (320, tok.eos_token_id, tok.pad_token_id, 384)
    assert mtok.tokenize(docs[0]) == tok(docs[0]).input_ids
    seq, n = 32, 20
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=seq, blend=([res.data_path], None), split="100,0,0", tokenizer=mtok,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"))
    train, valid, test = BlendedMegatronDatasetBuilder(GPTDataset, [n, None, None], lambda: True, config).build()
    assert isinstance(train, GPTDataset) and valid is None and test is None and len(train) >= n

    # The documents are shuffled, then concatenated; sample k is window [k*seq, (k+1)*seq] of that stream.
    doc_ids = {i: tok(t).input_ids + [tok.eos_token_id] for i, t in enumerate(docs)}
    assert sorted(train.document_index.tolist()) == list(range(len(docs)))  # one epoch covers n samples
    stream = np.concatenate([doc_ids[int(d)] for d in train.document_index])
    assert len(stream) == res.n_tokens
    for j in range(n):
        s = train[j]
        assert s["tokens"].shape == s["labels"].shape == s["loss_mask"].shape == (seq,)
        assert s["tokens"][1:].tolist() == s["labels"][:-1].tolist()
        k = int(train.shuffle_index[j])
        window = stream[k * seq:(k + 1) * seq + 1]
        assert s["tokens"].tolist() == window[:-1].tolist() and s["labels"].tolist() == window[1:].tolist()
        assert bool(s["loss_mask"].all())  # pad id != eod id: nothing masked


def test_quickstart_data(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    assert mq.make_corpus(50) == mq.make_corpus(50) != mq.make_corpus(50, seed=1)
    r = mq.make_quickstart(str(tmp_path), n_docs=400, progress=False)
    assert r["vocab_size"] == mq.VOCAB_SIZE == 768 and (r["eod_id"], r["pad_id"]) == (0, 1)
    assert r["data_path"] == str(tmp_path / "quickstart_text_document")
    ds = IndexedDataset(r["data_path"])
    assert len(ds) == 400 and all(ds[i][-1] == 0 for i in range(len(ds)))
    with open(tmp_path / "tokenizer" / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"  # loadable by transformers 4.x too
    assert _megatron_tokenizer(r["tokenizer"], tp=1)[1] == 768 and _megatron_tokenizer(r["tokenizer"], tp=2)[1] == 768


# ------------------------------------------------------------------------------------------------
# Issue 8: inputs that used to end in a raw traceback name the file (and the row)
# ------------------------------------------------------------------------------------------------
def test_empty_input_files_are_named(tmp_path, corpus, tok_dir):
    (tmp_path / "empty.jsonl").write_bytes(b"")                 # was "StopIteration"
    (tmp_path / "blank.jsonl").write_bytes(b"\n \n\n")
    for name, why in (("empty.jsonl", "is empty (0 bytes)"), ("blank.jsonl", "holds only blank lines")):
        with pytest.raises(pp.PreprocessError) as e:
            _run(tmp_path, [corpus, str(tmp_path / name)], tok_dir)
        assert str(tmp_path / name) in str(e.value) and why in str(e.value)
    assert _outputs(tmp_path) == []


def test_text_that_is_not_utf8_names_the_row(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "latin1.jsonl"                              # was a raw UnicodeDecodeError traceback
    src.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(pp.PreprocessError) as e:
        _run(tmp_path, [str(src)], tok_dir)
    assert f"document 2 (row 2 of {str(src)!r})" in str(e.value) and "not valid UTF-8" in str(e.value)
    assert "0xe9" in str(e.value)
    bad = pa.array([b"good", b"ba\xffd"], pa.binary()).view(pa.string())   # pyarrow keeps such bytes
    pq.write_table(pa.table({"text": bad}), str(tmp_path / "bad.parquet"))
    with pytest.raises(pp.PreprocessError, match=r"row 1 of .*bad\.parquet.*not valid UTF-8"):
        _run(tmp_path, [str(tmp_path / "bad.parquet")], tok_dir)
    assert _outputs(tmp_path) == []


def test_unwritable_output_prefix_fails_before_work(tmp_path, corpus, tok_dir, capsys):
    (tmp_path / "a_file").write_text("x")
    prefix = str(tmp_path / "a_file" / "sub" / "out")            # was FileExistsError from os.makedirs
    with pytest.raises(pp.PreprocessError) as e:
        pp.preprocess(inputs=[corpus], tokenizer_dir=tok_dir, output_prefix=prefix, progress=False,
                      log=lambda *a: None)
    assert "--output-prefix" in str(e.value) and "is a file, not a directory" in str(e.value)
    assert pp.main(["--input", corpus, "--tokenizer", tok_dir, "--output-prefix", prefix, "--no-progress"]) == 2
    assert "--output-prefix" in capsys.readouterr().err
    (tmp_path / "dir_text_document.bin").mkdir()
    with pytest.raises(pp.PreprocessError, match="is a directory"):
        _run(tmp_path, [corpus], tok_dir, name="dir")


def test_io_error_while_writing_names_the_output(tmp_path, corpus, tok_dir, monkeypatch):
    import errno

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", self.data_file.name)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", full_disk)
    with pytest.raises(pp.PreprocessError) as e:
        _run(tmp_path, [corpus], tok_dir)
    assert "No space left on device" in str(e.value) and "out_text_document" in str(e.value)
    assert _outputs(tmp_path) == []
