"""The label model's inputs gathered as arrays (`curation.labels.reliability`): the scorers' votes per item, dense
codes of keys and a two-key sort."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class _ScorerVotes:
    """The scorers' decisive votes gathered per item (I items, M scorers), one per (item, scorer)."""
    scorers: list[str]  # (M,) sorted names
    features: np.ndarray  # (I, M) float32 normalised margin toward the item's first image, 0 without a vote
    voted: np.ndarray  # (I, M) bool
    chosen_flip: np.ndarray  # (I, M) bool: the vote kept is on a pair showing the item's second image first
    agree: np.ndarray  # (M,) decisive votes (all of them) agreeing with the pair's decisive human label
    judged: np.ndarray  # (M,) decisive votes on pairs with a decisive human label


def _scorer_votes(votes: pl.LazyFrame, pair_id: pl.Series, pair_item: np.ndarray, pair_flip: np.ndarray,
                  id_rank: np.ndarray | None, label_0: np.ndarray, max_abs_margin: float,
                  chunk_votes: int = 1_000_000) -> _ScorerVotes:
    """Gather the votes, a batch at a time, into per-item arrays: each (item, scorer) keeps the vote on
    the item's pair with the smallest id rank (the pairs of an item may show its images either way
    round, or with prompts that move a prompt-aware scorer, so "the first vote in input order" would
    make the fit depend on the order of the pairs). Integer pair ids (curate's row numbers) are looked
    up by a binary search, string ids by a join; memory is the per-item arrays plus one batch."""
    n_pairs, n_items = pair_item.size, int(pair_item.max()) + 1 if pair_item.size else 0
    schema = votes.collect_schema()
    margin = pl.col("normalized_margin") if "normalized_margin" in schema.names() else 2.0 * pl.col("vote") - 1.0
    integer_ids = pair_id.dtype.is_integer()
    # curate stages the scorer names as categorical already: a round trip through 5M strings costs 0.15 s of CPU
    scorer = pl.col("scorer") if schema["scorer"] == pl.Categorical else pl.col("scorer").cast(pl.String).cast(
        pl.Categorical)
    decisive = votes.filter(pl.col("vote").is_in([0.0, 1.0])).select(
        pl.col("pair_id") if integer_ids else pl.col("pair_id").cast(pl.String), scorer=scorer,
        _vote0=pl.col("vote") == 1.0,
        _margin=margin.cast(pl.Float32).fill_null(0.0).fill_nan(0.0))
    present = decisive.select(pl.col("scorer").unique()).collect()["scorer"]  # categorical: names and codes
    scorers = sorted(present.cast(pl.String).to_list())
    n_scorers = len(scorers)
    physical = present.to_physical().to_numpy().astype(np.int64)
    code_of = np.full(int(physical.max()) + 1 if physical.size else 0, -1, np.int32)  # categorical code -> index
    code_of[physical] = [scorers.index(name) for name in present.cast(pl.String).to_list()]
    if integer_ids:
        ids = pair_id.to_numpy()
        contiguous = bool(ids.size) and ids[0] == 0 and ids[-1] == ids.size - 1 and bool(np.all(np.diff(ids) == 1))
        order = None if contiguous else np.argsort(ids, kind="stable")
    else:
        index = pl.DataFrame({"pair_id": pair_id, "_row": np.arange(n_pairs, dtype=np.int64)})
    features = np.zeros((n_items, n_scorers), np.float32)
    voted = np.zeros((n_items, n_scorers), bool)
    chosen_flip = np.zeros((n_items, n_scorers), bool)
    best_flat = np.full(n_items * n_scorers, np.iinfo(np.int32).max, np.int32)  # (I * M,) id rank of the vote kept
    agree, judged = np.zeros(n_scorers), np.zeros(n_scorers)
    human_0, human_decisive = label_0 == 1.0, (label_0 == 0.0) | (label_0 == 1.0)
    if integer_ids:  # one batch at a time (50M votes: 5.5 s to stream and 0.5 GB peak, against 34 s by slices)
        batches = decisive.collect_batches(chunk_size=chunk_votes)
    else:
        batches = iter([decisive.collect().join(index, on="pair_id", how="inner", maintain_order="left")])
    for batch in batches:
        if integer_ids:
            vid = batch["pair_id"].to_numpy()
            if order is None:
                row = vid.astype(np.int64)
                known = (row >= 0) & (row < n_pairs)
            else:
                at = np.searchsorted(ids, vid, sorter=order).clip(0, max(n_pairs - 1, 0))
                row = order[at] if n_pairs else at
                known = ids[row] == vid if n_pairs else np.zeros(vid.size, bool)
        else:
            row, known = batch["_row"].to_numpy(), np.ones(batch.height, bool)
        code = code_of[batch["scorer"].to_physical().to_numpy()] if batch.height else np.zeros(0, np.int32)
        vote0, margin_0 = batch["_vote0"].to_numpy(), batch["_margin"].to_numpy()
        row, code, vote0, margin_0 = row[known], code[known], vote0[known], margin_0[known]
        h = human_decisive[row]
        agree += np.bincount(code[h], vote0[h] == human_0[row[h]], n_scorers)
        judged += np.bincount(code[h], minlength=n_scorers)
        # per (item, scorer) the vote of the smallest id rank, this batch's and the earlier batches' (ranks are
        # unique within an item: a vote is the new best where its rank is the minimum and below the old one)
        it, rank = pair_item[row], (row if id_rank is None else id_rank[row]).astype(np.int32)
        key = it * n_scorers + code
        before = best_flat[key]
        np.minimum.at(best_flat, key, rank)
        first = np.flatnonzero((rank == best_flat[key]) & (rank < before))
        it, code = it[first], code[first]
        flip = pair_flip[row[first]]
        features[it, code] = np.clip(margin_0[first], -max_abs_margin, max_abs_margin) * np.where(flip, -1, 1)
        voted[it, code], chosen_flip[it, code] = True, flip
    return _ScorerVotes(scorers, features, voted, chosen_flip, agree, judged)


def _argsort_by(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """(n,) order of the rows by (major, minor), two non-negative int64 arrays: one sort of a combined
    key when it fits in 63 bits, else np.lexsort."""
    if major.size == 0:
        return np.zeros(0, np.int64)
    span = int(minor.max()) + 1
    if (int(major.max()) + 1) * span < 2**62:
        return np.argsort(major.astype(np.int64) * span + minor, kind="stable")
    return np.lexsort((minor, major))


def _dense_codes(keys: pl.DataFrame) -> np.ndarray:
    """(R,) int64 code of each row's key, equal codes for equal keys, in [0, number of keys). Exact:
    a 64-bit row hash, checked against the keys themselves; a collision falls back to a sort."""
    if keys.height == 0:
        return np.zeros(0, np.int64)
    _, first, code = np.unique(keys.hash_rows(seed=0).to_numpy(), return_index=True, return_inverse=True)
    firsts = keys[first[code]]
    if all((keys[c] == firsts[c]).all() for c in keys.columns):
        return code.astype(np.int64)
    return keys.select(pl.struct(pl.all()).rank("dense")).to_series().to_numpy().astype(np.int64) - 1
