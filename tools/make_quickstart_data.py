"""Make the quickstart corpus, tokenizer and Megatron indexed dataset, all generated here.

    .venv/bin/python tools/make_quickstart_data.py --out data/quickstart
    # then pass to the launcher:
    #   --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/quickstart/tokenizer
    #   --data-path data/quickstart/quickstart_text_document

Nothing is downloaded: the text is synthesized by this script from a small hand-written grammar
with a fixed seed, so every run writes byte-identical files (a few seconds on 2 CPU cores):

    DIR/corpus.jsonl                         ~1.8 MB, 4000 documents {"text": ...}
    DIR/tokenizer/                           byte-level BPE, 768 tokens, a Hugging Face
                                             tokenizer directory (AutoTokenizer-loadable offline)
    DIR/quickstart_text_document.{bin,idx}   Megatron indexed dataset, one EOD after each document

The text is English-like and highly regular so that a tiny model's loss falls visibly within
~100 steps: templated sentences over a small vocabulary (names, objects, places), counting runs,
small-number arithmetic, a fixed set of invented facts repeated across documents, and fixed
sequences (weekdays, months, the alphabet).

Special tokens: ``<|endoftext|>`` is the eos/bos token (and the EOD Megatron appends);
``<|pad|>`` is a separate pad token, because Megatron-Core's dataset code warns about - and stops
honouring - a pad id that collides with eos/eod (megatron/core/datasets/megatron_dataset.py).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

SEED = 1234
N_DOCS = 4000
VOCAB_SIZE = 768
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [EOS_TOKEN, PAD_TOKEN]

NAMES = ["Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jack", "Kai", "Lena"]
OBJECTS = ["apple", "ball", "book", "cup", "hat", "key", "lamp", "map", "box", "coin", "kite",
           "pen"]
ADJS = ["red", "big", "small", "old", "new", "green", "blue", "soft", "heavy", "shiny"]
PLACES = ["park", "kitchen", "garden", "library", "market", "school", "forest", "harbor"]
VERBS = [("finds", "found"), ("takes", "took"), ("sees", "saw"), ("likes", "liked"),
         ("holds", "held"), ("paints", "painted"), ("drops", "dropped"), ("hides", "hid")]
FRIEND_VERBS = ["gives", "shows", "sends", "lends", "throws"]
TIMES = ["In the morning", "At noon", "In the evening", "At night", "On Monday", "Later"]
FEELINGS = ["happy", "tired", "curious", "calm", "surprised", "hungry"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
                "seventeen", "eighteen", "nineteen", "twenty"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"

# Invented facts, each always stated the same way, so the model can memorize them.
COUNTRIES = ["Zorbia", "Quellan", "Mirrow", "Tavish", "Oddland", "Pellor", "Vantis", "Brumm"]
CAPITALS = ["Kelt", "Arnos", "Vey", "Tolbek", "Smee", "Ruun", "Dalo", "Fenn"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey",
           "pink", "brown", "gold"]
ANIMALS = ["cat", "dog", "owl", "fox", "horse", "goat", "frog", "bear", "duck", "crow", "deer",
           "seal"]


def _facts() -> list[str]:
    facts = [f"The capital of {c} is {k}." for c, k in zip(COUNTRIES, CAPITALS)]
    facts += [f"{n} has a pet {a}." for n, a in zip(NAMES, ANIMALS)]
    facts += [f"The favourite colour of {n} is {c}." for n, c in zip(NAMES, COLOURS)]
    return facts


FACTS = _facts()


def _story_sentence(rng: random.Random) -> str:
    name, other = rng.sample(NAMES, 2)
    adj, obj, place = rng.choice(ADJS), rng.choice(OBJECTS), rng.choice(PLACES)
    present, past = rng.choice(VERBS)
    kind = rng.randrange(5)
    art = "an" if adj[0] in "aeiou" else "a"
    if kind == 0:
        return f"{name} {present} {art} {adj} {obj} in the {place}."
    if kind == 1:
        return f"{rng.choice(TIMES)}, {name} {past} the {adj} {obj}."
    if kind == 2:
        return f"{name} {rng.choice(FRIEND_VERBS)} the {obj} to {other}, and {other} is " \
               f"{rng.choice(FEELINGS)}."
    if kind == 3:
        return f"The {obj} is {adj}. {name} puts the {obj} in the {place}."
    return f"{name} and {other} go to the {place}. They see {art} {adj} {obj}."


def _counting(rng: random.Random) -> str:
    if rng.random() < 0.5:
        start = rng.randrange(0, 60)
        n = rng.randrange(5, 12)
        step = rng.choice([1, 1, 1, 2, 5, 10])
        return f"Counting by {step} from {start}: " + ", ".join(
            str(start + i * step) for i in range(n)) + "."
    start = rng.randrange(0, 12)
    n = rng.randrange(4, 21 - start) if start < 17 else 4
    words = NUMBER_WORDS[start:start + n]
    return " ".join(words).capitalize() + "."


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(0, 20), rng.randrange(0, 20)
    kind = rng.randrange(3)
    if kind == 0:
        return f"{a} plus {b} is {a + b}."
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{a} minus {b} is {a - b}."
    a, b = a % 10, b % 10
    return f"{a} times {b} is {a * b}."


def _sequence(rng: random.Random) -> str:
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(7)
        return f"After {WEEKDAYS[i]} comes {WEEKDAYS[(i + 1) % 7]}."
    if kind == 1:
        i = rng.randrange(12)
        n = rng.randrange(3, 7)
        return "The months go " + ", ".join(MONTHS[(i + k) % 12] for k in range(n)) + "."
    i = rng.randrange(0, 20)
    return "Letters: " + " ".join(LETTERS[i:i + rng.randrange(4, 8)]) + "."


_KINDS = [(_story_sentence, 5), (_counting, 2), (_arithmetic, 3), (_sequence, 1),
          (lambda rng: rng.choice(FACTS), 3)]


def make_document(rng: random.Random) -> str:
    """One document: a few paragraphs, each leaning towards one kind of sentence."""
    gens = [g for g, _ in _KINDS]
    weights = [w for _, w in _KINDS]
    paragraphs = []
    for _ in range(rng.randrange(2, 5)):
        main = rng.choices(gens, weights)[0]
        sentences = [main(rng) if rng.random() < 0.7 else rng.choices(gens, weights)[0](rng)
                     for _ in range(rng.randrange(2, 7))]
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def make_corpus(n_docs: int = N_DOCS, seed: int = SEED) -> list[str]:
    """The quickstart documents, deterministic in (n_docs, seed)."""
    rng = random.Random(seed)
    return [make_document(rng) for _ in range(n_docs)]


def write_jsonl(docs: list[str], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in docs:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def train_tokenizer(docs: list[str], out_dir: str, vocab_size: int = VOCAB_SIZE):
    """Train a byte-level BPE on ``docs`` and save it as a Hugging Face tokenizer directory.

    Returns the ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        pad_token=PAD_TOKEN,
        model_max_length=1 << 30,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir)
    # transformers 5 records its own class name ("TokenizersBackend") and a "backend" key, which
    # transformers 4.x's AutoTokenizer cannot resolve; the generic fast-tokenizer class loads in both.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.pop("backend", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    return hf


def make_quickstart(out: str, n_docs: int = N_DOCS, seed: int = SEED, workers: int = 1,
                    progress: bool = True) -> dict:
    """Write corpus.jsonl, tokenizer/ and quickstart_text_document.{bin,idx} under ``out``."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import preprocess_data

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    docs = make_corpus(n_docs, seed)
    corpus = os.path.join(out, "corpus.jsonl")
    write_jsonl(docs, corpus)
    tok_dir = os.path.join(out, "tokenizer")
    hf = train_tokenizer(docs, tok_dir)
    result = preprocess_data.preprocess(
        inputs=[corpus], tokenizer_dir=tok_dir, output_prefix=os.path.join(out, "quickstart"),
        append_eod=True, workers=workers, progress=progress,
    )
    return dict(corpus=corpus, corpus_bytes=os.path.getsize(corpus), n_docs=len(docs),
                tokenizer=tok_dir, vocab_size=len(hf), eod_id=hf.eos_token_id,
                pad_id=hf.pad_token_id, data_path=result.data_path, n_tokens=result.n_tokens,
                seconds=time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--n-docs", type=int, default=N_DOCS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    r = make_quickstart(args.out, args.n_docs, args.seed, args.workers)
    print(f"corpus:     {r['corpus']} ({r['n_docs']} documents, {r['corpus_bytes'] / 1e6:.2f} MB,"
          f" {r['n_tokens']} tokens incl. EOD)")
    print(f"tokenizer:  {r['tokenizer']} (vocab size {r['vocab_size']}, eod id {r['eod_id']},"
          f" pad id {r['pad_id']})")
    print(f"launcher:   --tokenizer-type HuggingFaceTokenizer --tokenizer-model {r['tokenizer']}"
          f" --data-path {r['data_path']}")
    print(f"done in {r['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
