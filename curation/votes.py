"""Per-pair scorer votes: per-image scores (lake `scores` table) -> one row per (pair, scorer).

A scorer's *margin* on a pair is `s(image_0) - s(image_1)`, sign-flipped for lower-is-better
scorers, so that a positive margin always means "the scorer prefers image_0". Its *vote* is the
sign of the margin mapped to the `label_0` convention of the pairs table (1.0 = image_0,
0.0 = image_1, 0.5 = exact tie). Its *normalized margin* divides the margin by the scorer's
dataset-wide spread of margins, so margins of scorers on different scales (a cosine near 0.2,
an aesthetic score near 5) become comparable: one unit = one typical margin of that scorer.
This is the dataset-wide stand-in for the per-batch L2 normalisation of Adaptive-DPO
(`methods.md` §2.3); see `curation.pair_metrics` for how it is used.
"""
from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Literal

import polars as pl


logger = logging.getLogger(__name__)

# prompt_id under which prompt-free scorers (aesthetic, sharpness, ...) store their scores;
# such scorers are joined on image_id only, so any prompt_id they carry is ignored.
PROMPT_FREE_PROMPT_ID = ""

# 1.4826 * median|x| estimates sigma for a zero-mean normal x (1 / Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826

VOTE_COLUMNS = ["pair_id", "scorer", "score_0", "score_1", "margin", "vote", "normalized_margin"]
VOTES_SCHEMA = {
    "pair_id": pl.String, "scorer": pl.String, "score_0": pl.Float64, "score_1": pl.Float64,
    "margin": pl.Float64, "vote": pl.Float64, "normalized_margin": pl.Float64,
}

Spread = Literal["rms", "mad"]


def as_lazy(data: pl.DataFrame | pl.LazyFrame, name: str, required: list[str]) -> pl.LazyFrame:
    """`data` as a LazyFrame, after checking that it has the `required` columns."""
    if not isinstance(data, (pl.DataFrame, pl.LazyFrame)):
        raise TypeError(f"{name} must be a polars DataFrame or LazyFrame, got {type(data).__name__}")
    lazy = data.lazy()
    missing = [c for c in required if c not in lazy.collect_schema().names()]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; it has {lazy.collect_schema().names()}")
    return lazy


def margin_spread(margin: pl.Expr, spread: Spread) -> pl.Expr:
    """Scale of a scorer's margins over all its pairs (an aggregate over one scorer's rows).

    - "rms": sqrt(mean(margin^2)), the uncentred L2 norm per pair. It is the dataset-wide
      analogue of Adaptive-DPO's per-batch normalisation l_i / ||l||_batch (methods.md §2.3):
      ||l||_batch ~ sqrt(B) * rms, so l_i / ||l||_batch ~ normalized_margin / sqrt(B).
    - "mad": 1.4826 * median(|margin|), a robust version (the MAD about zero, not about the median,
      because the sign of a margin is meaningful). Equals "rms" for zero-mean normal margins; it
      falls back to "rms" when more than half the margins are exact ties (median |margin| = 0).
    A spread of 0 (every margin is 0) gives normalized margins of 0.
    """
    rms = (margin**2).mean().sqrt()
    if spread == "rms":
        return rms
    if spread == "mad":
        mad = MAD_TO_SIGMA * margin.abs().median()
        return pl.when(mad > 0).then(mad).otherwise(rms)
    raise ValueError(f"unknown spread {spread!r}; expected 'rms' or 'mad'")


def compute_votes(
    pairs: pl.DataFrame | pl.LazyFrame,
    scores: pl.DataFrame | pl.LazyFrame,
    scorers: Mapping[str, bool],
    *,
    prompt_free: Collection[str] = (),
    spread: Spread = "rms",
) -> pl.DataFrame:
    """One row per (pair, scorer) that has both images scored.

    Args:
        pairs: columns pair_id, prompt_id, image_0_id, image_1_id (the lake `pairs` table).
            Prompt-free scorers' scores are found whatever prompt_id they were stored under
            (conventionally PROMPT_FREE_PROMPT_ID).
        scores: columns image_id, prompt_id, scorer, score (the lake `scores` table); at most one
            row per (image_id, prompt_id, scorer), or per (image_id, scorer) for prompt-free scorers.
        scorers: scorer name -> higher_is_better. Scorers not listed are ignored.
        prompt_free: scorers whose score does not depend on the prompt; joined on image_id only.
        spread: scale used for `normalized_margin` (see `margin_spread`).

    Returns:
        DataFrame[pair_id, scorer, score_0, score_1, margin, vote, normalized_margin] where
        margin = sign * (score_0 - score_1) with sign = +1 (higher is better) or -1, vote = 1.0 if
        margin > 0, 0.0 if margin < 0, 0.5 if margin == 0, and normalized_margin = margin / spread
        of that scorer over all returned pairs. A pair lacking a (non-NaN) score for either image
        gets no row for that scorer; the counts are logged (see also `missing_vote_counts`).
        Rows come grouped by scorer (in the order of `scorers`), pairs in the order of `pairs`.
    """
    if not scorers:
        raise ValueError("scorers is empty: give at least one scorer name -> higher_is_better")
    unknown = sorted(set(prompt_free) - set(scorers))
    if unknown:
        raise ValueError(f"prompt_free names scorer(s) {unknown} that are not in scorers {sorted(scorers)}")
    pair_frame = as_lazy(pairs, "pairs", ["pair_id", "prompt_id", "image_0_id", "image_1_id"]).select(
        "pair_id", "prompt_id", "image_0_id", "image_1_id")
    names = list(scorers)
    score_frame = (
        as_lazy(scores, "scores", ["image_id", "prompt_id", "scorer", "score"])
        .select("image_id", "prompt_id", "scorer", pl.col("score").cast(pl.Float64))
        .filter(pl.col("scorer").is_in(names) & pl.col("score").is_not_null() & pl.col("score").is_not_nan())
        .with_columns(pl.col("scorer").replace_strict({s: f"_s{i}" for i, s in enumerate(names)},
                                                      return_dtype=pl.String))
        .collect()
    )
    # Scores go wide (one column per scorer) so that each side of a pair is one join of n_pairs rows
    # rather than n_pairs * n_scorers; prompt-free scorers get their own table keyed on image_id.
    pair_wide = pair_frame
    for keys, group in ((["image_id", "prompt_id"], [s for s in names if s not in prompt_free]),
                        (["image_id"], [s for s in names if s in prompt_free])):
        if not group:
            continue
        columns = [f"_s{names.index(s)}" for s in group]
        part = score_frame.filter(pl.col("scorer").is_in(columns))
        try:  # (n_keys, len(columns)); pivot without an aggregate refuses duplicate keys
            wide = part.pivot(on="scorer", on_columns=columns, index=keys, values="score").lazy()
        except pl.exceptions.ComputeError as exc:
            raise ValueError(f"scores has duplicate ({', '.join(keys)}, scorer) rows for scorer(s) {group}; "
                             "keep one scorer_version per scorer first") from exc
        for side in ("0", "1"):
            pair_wide = pair_wide.join(
                wide.rename({c: f"{c}_{side}" for c in columns}),
                left_on=[f"image_{side}_id"] + keys[1:], right_on=keys, how="left", maintain_order="left")
    def scorer_votes(i: int, name: str) -> pl.LazyFrame:  # one scorer's rows; its spread is a plain aggregate
        margin = (1.0 if scorers[name] else -1.0) * (pl.col("score_0") - pl.col("score_1"))
        return (
            pair_wide.select("pair_id", scorer=pl.lit(name), score_0=pl.col(f"_s{i}_0"), score_1=pl.col(f"_s{i}_1"))
            .filter(pl.col("score_0").is_not_null() & pl.col("score_1").is_not_null())
            .with_columns(margin=margin)
            .with_columns(
                vote=pl.when(pl.col("margin") > 0).then(1.0).when(pl.col("margin") < 0).then(0.0).otherwise(0.5),
                _spread=margin_spread(pl.col("margin"), spread),
            )
            .with_columns(normalized_margin=pl.when(pl.col("_spread") > 0)
                          .then(pl.col("margin") / pl.col("_spread")).otherwise(0.0))
            .select(VOTE_COLUMNS)
        )

    # (n_pairs * n_scorers) rows at most, grouped by scorer in the order of `scorers`
    votes = pl.concat([scorer_votes(i, name) for i, name in enumerate(names)]).cast(VOTES_SCHEMA).collect()
    if logger.isEnabledFor(logging.INFO):
        counts = missing_vote_counts(pair_frame, votes, list(scorers))
        for scorer, n_missing in counts.iter_rows():
            if n_missing:
                logger.info("compute_votes: %d pair(s) have no %s vote (an image lacks a score)", n_missing, scorer)
    return votes


def missing_vote_counts(
    pairs: pl.DataFrame | pl.LazyFrame, votes: pl.DataFrame | pl.LazyFrame, scorers: Collection[str]
) -> pl.DataFrame:
    """DataFrame[scorer, n_missing]: how many pairs got no vote from each scorer (missing scores)."""
    n_pairs = as_lazy(pairs, "pairs", ["pair_id"]).select(pl.len()).collect().item()
    have = (as_lazy(votes, "votes", ["pair_id", "scorer"]).group_by("scorer").agg(n=pl.len()).collect())
    return (
        pl.DataFrame({"scorer": list(scorers)}, schema={"scorer": pl.String})
        .join(have, on="scorer", how="left")
        .select("scorer", n_missing=(n_pairs - pl.col("n").fill_null(0)).cast(pl.Int64))
    )
