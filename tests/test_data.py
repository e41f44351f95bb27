"""Documents, packing layout and masks, and the deterministic / resumable / sharded batch iterator."""
import itertools
import json

import pytest
import torch

from quietstar import assets
from quietstar.data import (RowDataset, batches, epoch_permutation, load_documents, pack_rows,
                            steps_per_epoch, tokenize_documents)


# ----------------------------------------------------------------------------- pack_rows

def test_pack_rows_layout_and_mask_by_hand():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    # stream: 0 5 6 7 | 0 8 9 0 | 10 11 12 13   (12 tokens, 3 full rows of T=4)
    input_ids, target_mask = pack_rows(docs, T=4, sep_id=0)
    assert input_ids.dtype == torch.long and target_mask.dtype == torch.bool
    assert input_ids.tolist() == [[0, 5, 6, 7], [0, 8, 9, 0], [10, 11, 12, 13]]
    # target_mask[r, t] <=> input_ids[r, t+1] is a document token of this row.
    assert target_mask.tolist() == [[True, True, True, False],     # targets 5 6 7 | (next row)
                                    [True, True, False, False],    # targets 8 9 | sep 0 not scored
                                    [True, True, True, False]]     # targets 11 12 13


def test_pack_rows_drops_partial_row_and_inserts_bos():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    # stream: 2 1 5 6 7 | 2 1 8 9 2 | 1 10 11 12 13   (15 tokens: rows of T=5, none partial)
    input_ids, target_mask = pack_rows(docs, T=5, sep_id=2, bos_id=1)
    assert input_ids.tolist() == [[2, 1, 5, 6, 7], [2, 1, 8, 9, 2], [1, 10, 11, 12, 13]]
    assert target_mask.tolist() == [[False, True, True, True, False],   # target 1 (bos) not scored
                                    [False, True, True, False, False],
                                    [True, True, True, True, False]]
    input_ids, _ = pack_rows(docs, T=4, sep_id=2, bos_id=1)  # 15 // 4 = 3 rows, 3 tokens dropped
    assert input_ids.shape == (3, 4) and input_ids[-1].tolist() == [9, 2, 1, 10]
    with pytest.raises(ValueError):
        pack_rows([[1, 2]], T=8, sep_id=0)  # no full row


def test_pack_rows_masks_by_layout_not_by_value():
    # A document may contain the separator id itself; it is a real target, scored.
    input_ids, target_mask = pack_rows([[0, 4], [0]], T=5, sep_id=0)
    assert input_ids.tolist() == [[0, 0, 4, 0, 0]]
    assert target_mask.tolist() == [[True, True, False, True, False]]


def test_pack_rows_mistral_equals_bos_plus_encode_concatenated():
    tok = assets.mistral_tokenizer()
    docs = load_documents("math", "heldout")[:20]
    input_ids, target_mask = pack_rows(tokenize_documents(docs, tok), T=64, sep_id=1)
    stream = [i for d in docs for i in tok(d)["input_ids"]]  # [1] + encode(d), per document
    R = len(stream) // 64
    assert input_ids.flatten().tolist() == stream[:R * 64]
    next_tok = input_ids[:, 1:]
    assert (next_tok[target_mask[:, :-1]] != 1).all()  # no BOS is a scored target
    assert int(target_mask.sum()) == R * 63 - int((next_tok == 1).sum())  # no "1" inside MATH text


def test_smollm2_heldout_target_count_matches_assets_md():
    """DESIGN.md section 11: MATH held-out, rows of 256, [0] + doc + [0] + doc: 155,051 scored targets."""
    ds = RowDataset.from_documents(load_documents("default", "heldout"), assets.smollm2_tokenizer(),
                                   T=256, sep_id=assets.SMOLLM2_SEP_ID)
    assert ds.num_targets == 155_051
    assert (ds.input_ids[:, 1:][ds.target_mask[:, :-1]] != 0).all()


# ----------------------------------------------------------------------------- documents

def test_load_documents_default_equals_math():
    for split in ("train", "heldout"):
        assert load_documents("default", split) == assets.math_documents(split)
    with pytest.raises(ValueError):
        load_documents("math", "validation")


def test_load_documents_from_files(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("First doc.\n\nStill the first doc.\n", encoding="utf-8")
    b = tmp_path / "b.jsonl"
    b.write_text("\n".join(json.dumps(o) for o in (
        {"text": "jsonl text"}, {"problem": "P?", "solution": "S."}, {"text": "   "})) + "\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    docs = load_documents([a, str(b), empty])
    assert docs == ["First doc.\n\nStill the first doc.\n", "jsonl text", "P?\nS."]
    assert load_documents(str(a), "heldout") == docs[:1]  # files are their own split
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="text"):
        load_documents([bad])
    with pytest.raises(FileNotFoundError):
        load_documents([tmp_path / "missing.txt"])


def test_parquet_and_gzipped_json_lines_and_a_lazy_slice(tmp_path):
    """The paper's corpus (OpenWebMath) ships as Parquet shards: a "text" column (or problem + solution) is read
    a record batch at a time; .jsonl.gz like .jsonl; max_documents reads no further than it needs."""
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [f"document {i}: " + "x " * (i % 7) for i in range(2500)] + ["  "]
    pq.write_table(pa.table({"text": texts, "url": ["u"] * len(texts)}), tmp_path / "owm.parquet",
                   row_group_size=700)
    pq.write_table(pa.table({"problem": ["P?"], "solution": ["S."]}), tmp_path / "ps.parquet")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gz doc"}) + "\n")
    docs = load_documents([tmp_path / "owm.parquet", tmp_path / "ps.parquet", tmp_path / "c.jsonl.gz"])
    assert docs == texts[:-1] + ["P?\nS.", "gz doc"]
    # the first 2,100 documents come from the first file alone: the missing one after it is never opened
    assert load_documents([tmp_path / "owm.parquet", tmp_path / "missing.parquet"], max_documents=2100) == texts[:2100]
    with pytest.raises(FileNotFoundError):
        load_documents([tmp_path / "owm.parquet", tmp_path / "missing.parquet"], max_documents=2600)
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="needs a 'text' column.*it has content"):
        load_documents([tmp_path / "other.parquet"])
    # a null text is an empty document (dropped); a number is an error naming the file and row / line
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "nulls.parquet")
    assert load_documents([tmp_path / "nulls.parquet"]) == ["a", "b"]
    (tmp_path / "num.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": 5}) + "\n")
    with pytest.raises(ValueError, match="num.jsonl:2: the document field is int, expected a string"):
        load_documents([tmp_path / "num.jsonl"])
    whole = (tmp_path / "c.jsonl.gz").read_bytes()
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="cut.jsonl.gz: a truncated or corrupt gzip file"):
        load_documents([tmp_path / "cut.jsonl.gz"])


def test_rows_of_a_slice_are_the_first_rows_of_everything(tmp_path, monkeypatch):
    """train.load_rows(max_rows=R) reads documents until R rows are full (in chunks of 512): the same rows as
    packing them all, from fewer documents."""
    from quietstar import assets
    from quietstar import data as qdata
    from quietstar.train import load_rows
    tok = assets.mistral_tokenizer()
    full = load_rows(("default",), tok, 64, with_doc_start=True)                 # 4,497 documents
    read = []
    real = qdata.tokenize_documents
    monkeypatch.setattr(qdata, "tokenize_documents", lambda docs, t: read.append(len(docs)) or real(docs, t))
    for R, most in ((1, 512), (2000, 2048), (full[0].shape[0], 4497)):
        read.clear()
        part = load_rows(("default",), tok, 64, with_doc_start=True, max_rows=R)
        assert len(part) == 3 and all(torch.equal(a[:R], b) for a, b in zip(full, part))
        assert sum(read) <= most, (R, read)
    assert sum(read) == 4497
    few = load_rows(("default",), tok, 64, split="heldout", max_documents=10)
    docs = load_documents("default", "heldout")[:10]
    assert torch.equal(few[0], pack_rows(tokenize_documents(docs, tok), 64, sep_id=1)[0])


# ----------------------------------------------------------------------------- batches

def _rows(R=23, T=3):
    ids = torch.arange(R * T).reshape(R, T)  # row r holds r*T ... : its identity is ids[:, 0] // T
    return RowDataset(ids, torch.rand(R, T) > 0.5)


def _row_ids(batch):
    return (batch[0][:, 0] // batch[0].shape[1]).tolist()


def test_batches_deterministic_and_epoch_reshuffle():
    rows = _rows()
    n = steps_per_epoch(len(rows), batch_size=4)
    assert n == 5  # 23 // 4; 3 rows left out of each epoch
    a = [_row_ids(b) for b in itertools.islice(batches(rows, 4, seed=7), 3 * n)]
    b = [_row_ids(b) for b in itertools.islice(batches(rows, 4, seed=7), 3 * n)]
    c = [_row_ids(b) for b in itertools.islice(batches(rows, 4, seed=8), 3 * n)]
    assert a == b and a != c
    epochs = [sum(a[e * n:(e + 1) * n], []) for e in range(3)]
    for e, used in enumerate(epochs):
        assert len(set(used)) == 20  # each row at most once per epoch
        assert used == epoch_permutation(23, 7, e)[:20].tolist()
    assert epochs[0] != epochs[1] != epochs[2]
    # Masks travel with their rows.
    first = next(batches(rows, 4, seed=7))
    assert torch.equal(first[1], rows.target_mask[first[0][:, 0] // 3])


def test_batches_resume_exactly():
    rows = _rows()
    full = [_row_ids(b) for b in itertools.islice(batches(rows, 4, seed=3), 17)]
    for start in (1, 4, 5, 11):  # inside an epoch and at / across epoch boundaries
        resumed = [_row_ids(b) for b in itertools.islice(batches(rows, 4, seed=3, start_step=start),
                                                         17 - start)]
        assert resumed == full[start:]


def test_batches_shard_disjointly_across_ranks():
    rows = _rows(R=50)
    W, B = 3, 4
    n = steps_per_epoch(len(rows), B, W)
    assert n == 4
    per_rank = [[_row_ids(b) for b in itertools.islice(batches(rows, B, 5, rank=r, world_size=W), 2 * n)]
                for r in range(W)]
    single = [_row_ids(b) for b in itertools.islice(batches(rows, B * W, 5), 2 * n)]
    for step in range(2 * n):
        shards = [set(per_rank[r][step]) for r in range(W)]
        assert all(len(s) == B for s in shards)
        assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
        # The ranks together see exactly the single-process batch of B * W rows.
        assert sum((per_rank[r][step] for r in range(W)), []) == single[step]
    for e in range(2):  # and never the same row twice within an epoch
        used = [i for r in range(W) for s in range(e * n, (e + 1) * n) for i in per_rank[r][s]]
        assert len(used) == len(set(used)) == n * B * W
    with pytest.raises(ValueError):
        next(batches(rows, 4, 5, rank=3, world_size=3))
    with pytest.raises(ValueError):
        next(batches(rows, 40, 5, world_size=2))  # fewer rows than one global batch
