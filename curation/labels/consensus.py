"""Multi-scorer consensus labels: BalancedDPO's majority vote over preference scorers.

BalancedDPO (Tamboli et al., arXiv 2503.12575, TMLR 2026) relabels each pair by "a majority-vote
consensus over multiple preference scorers" (v2 abstract): the scorers vote, the human label does
not. The paper's published text states neither a tie rule nor any role for the human label, so the
default here is the rule that adds nothing the paper does not say:

    y = 1[ sum_m v_m > M / 2 ]     v_m = 1 if scorer m prefers image_0, 0 if image_1, 0.5 if tied
    a split vote (sum_m v_m = M / 2) gives no label and the pair is dropped (tie_policy "drop")

as Diffusion-DPO drops Pick-a-Pic's tied pairs (Wallace et al., arXiv 2311.12908, `train.py`).

Tie policies, for a split vote (vote fraction exactly 1/2):
- "drop" (default, the paper form): no label (consensus_label null, consensus_source "split");
- "scorer_margin": still scorers only; the sign of the mean normalized margin of the scorers
  (`prefcurate.curation.labels.votes`: one unit = one typical margin of that scorer) decides; an exact 0 stays split;
- "human_fallback": use the human label_0 (not the paper's method: the human decides splits);
- "human_vote": the human label_0 is one more voter (with M = 4 scorers: 5 voters; the human then
  decides every 2-2 split, so labels follow the human's noise).
A human tie (label_0 = 0.5) is a half vote each way under "human_vote" and cannot break a split
under "human_fallback": the pair then gets no label. Pairs with no scorer vote at all keep the
human label (consensus_source "no_scorer_votes") under the two human policies only.

Agreement. `scorer_label` is the label the scorers alone reach (the rule, then "scorer_margin"
when that is the policy), whatever the tie policy; `human_agrees` compares the human with it, so
"human agrees with consensus" never counts a label the human voted in or decided.

Baselines named in BalancedDPO §4.2 (their exact definitions are not published; these follow the
names): "random_scorer" (one scorer per pair, chosen by a seeded hash of pair and scorer: the
same seed gives the same choice, within one Polars version, whatever the row order),
"vanilla_sum" (compare sum_m s_m, i.e. the sign of the summed margins) and "normalized_sum"
(compare sum_m of z-scored s_m). Their exact ties are resolved like a split vote, except that
"human_vote" acts as "human_fallback" (a sum has no vote to add the human to).
"""
from __future__ import annotations

from collections.abc import Collection
from typing import Literal

import polars as pl

from prefcurate.curation.labels.votes import as_lazy


TiePolicy = Literal["drop", "scorer_margin", "human_fallback", "human_vote"]
Method = Literal["majority", "random_scorer", "vanilla_sum", "normalized_sum"]
TIE_POLICIES = ("drop", "scorer_margin", "human_fallback", "human_vote")
METHODS = ("majority", "random_scorer", "vanilla_sum", "normalized_sum")

CONSENSUS_SCHEMA = {
    "pair_id": pl.String, "n_scorers": pl.Int64, "votes_for_0": pl.Float64, "vote_fraction": pl.Float64,
    "consensus_label": pl.Float64, "scorer_label": pl.Float64, "human_label": pl.Float64,
    "human_agrees": pl.Boolean, "consensus_source": pl.String,
}


def _sign_label(x: pl.Expr) -> pl.Expr:
    """1.0 if x > 0, 0.0 if x < 0, null if x is 0 or null: a decisive label or none."""
    return pl.when(x > 0).then(1.0).when(x < 0).then(0.0).otherwise(None)


def consensus(
    votes: pl.DataFrame | pl.LazyFrame,
    pairs: pl.DataFrame | pl.LazyFrame,
    scorers: Collection[str] | None = None,
    tie_policy: TiePolicy = "drop",
    *,
    method: Method = "majority",
    seed: int = 0,
) -> pl.DataFrame:
    """One row per pair of `pairs`, in the order of `pairs`.

    Args:
        votes: output of `prefcurate.curation.labels.votes.compute_votes`.
        pairs: columns pair_id, label_0 (the human label: 1, 0 or 0.5 for a tie).
        scorers: the scorers that vote; None = every scorer in `votes`.
        tie_policy: "drop" (default), "scorer_margin", "human_fallback" or "human_vote" (module docstring).
        method: "majority" (BalancedDPO) or a baseline: "random_scorer", "vanilla_sum", "normalized_sum".
        seed: seed of the "random_scorer" choice.

    Returns:
        DataFrame with
        - n_scorers: scorers with a vote on the pair;
        - votes_for_0: scorer votes for image_0 (a tied scorer counts 1/2), human excluded;
        - vote_fraction: share of voters for image_0, the human included under "human_vote";
          null when nobody voted;
        - consensus_label: 1.0 (image_0), 0.0 (image_1) or null (no decisive label);
        - scorer_label: the label of the scorers alone (rule, then "scorer_margin" if that is the
          policy); null on an unbroken split or without scorer votes;
        - human_label: label_0;
        - human_agrees: scorer_label == human_label; null when either is null or the human tied;
        - consensus_source: "majority" / the baseline's name (decided by the rule),
          "scorer_margin" (split broken by the scorers' mean normalized margin),
          "human_fallback" (tie broken by the human), "split" (tie left unbroken),
          "no_scorer_votes" (no scorer voted: human label, or null under "drop").
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie_policy {tie_policy!r}; expected one of {TIE_POLICIES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    vote_frame = as_lazy(votes, "votes", ["pair_id", "scorer", "vote", "margin", "score_0", "score_1",
                                          "normalized_margin"])
    if scorers is not None:
        vote_frame = vote_frame.filter(pl.col("scorer").is_in(list(scorers)))
    pair_frame = as_lazy(pairs, "pairs", ["pair_id", "label_0"]).select(
        pl.col("pair_id").cast(pl.String), human_label=pl.col("label_0").cast(pl.Float64))

    rule: dict[str, pl.Expr] = {}  # per pair: > 0 means image_0 wins under the baseline
    if method == "random_scorer":
        draw = pl.struct("pair_id", "scorer").hash(seed)
        rule["_rule"] = pl.col("vote").sort_by(draw).first() - 0.5
    elif method == "vanilla_sum":
        rule["_rule"] = pl.col("margin").sum()
    elif method == "normalized_sum":
        # z-scoring s -> (s - mean_m) / std_m turns a margin into margin / std_m; std_m is the
        # scorer's score std over the images of all pairs (each appearance counted once).
        mean = (pl.col("score_0").mean() + pl.col("score_1").mean()) / 2
        second_moment = ((pl.col("score_0") ** 2).mean() + (pl.col("score_1") ** 2).mean()) / 2
        vote_frame = vote_frame.with_columns(_std=(second_moment - mean**2).clip(0).sqrt().over("scorer"))
        rule["_rule"] = (pl.when(pl.col("_std") > 0).then(pl.col("margin") / pl.col("_std")).otherwise(0.0)).sum()

    per_pair = vote_frame.group_by("pair_id").agg(n_scorers=pl.len().cast(pl.Int64), votes_for_0=pl.col("vote").sum(),
                                                  mean_margin=pl.col("normalized_margin").mean(), **rule)
    counts = pair_frame.join(per_pair, on="pair_id", how="left", maintain_order="left")
    return consensus_from_counts(counts, tie_policy, method=method)


def consensus_from_counts(counts: pl.DataFrame | pl.LazyFrame, tie_policy: TiePolicy = "drop", *,
                          method: Method = "majority") -> pl.DataFrame:
    """The consensus rule (module docstring) on per-pair vote counts: CONSENSUS_SCHEMA, one row per row
    of `counts`, in its order. `consensus` aggregates the long votes into these counts; the curate stage
    sums them over a chunk's wide score columns (`prefcurate.curation.labels.votes.WideVotes`) and calls this directly.

    counts: pair_id (optional: without it the result has no pair_id column either, and the caller adds
    the ids it already holds), human_label (label_0), n_scorers (null or 0: no scorer vote), votes_for_0 (sum of
    the votes, 0/0.5/1 each), mean_margin (mean normalized margin of the votes, used only through its
    sign, by "scorer_margin") and, for a baseline `method`, _rule (> 0: image_0 wins)."""
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie_policy {tie_policy!r}; expected one of {TIE_POLICIES}")
    human = pl.col("human_label")
    human_decisive = human.is_in([0.0, 1.0])
    human_vote = tie_policy == "human_vote"
    n_voters = pl.col("n_scorers") + (human.is_not_null().cast(pl.Int64) if human_vote else 0)
    for_0 = pl.col("votes_for_0") + (human.fill_null(0.0) if human_vote else 0.0)
    decided = _sign_label(pl.col("vote_fraction") - 0.5) if method == "majority" else _sign_label(pl.col("_rule"))
    # the scorers' own label: the rule without the human, then their margin under "scorer_margin"
    scorer_rule = (_sign_label(pl.col("votes_for_0") / pl.col("n_scorers") - 0.5) if method == "majority"
                   else _sign_label(pl.col("_rule")))
    by_margin = _sign_label(pl.col("mean_margin")) if tie_policy == "scorer_margin" else pl.lit(None, pl.Float64)
    scorer_label = pl.when(pl.col("n_scorers") > 0).then(pl.coalesce(scorer_rule, by_margin))
    source_decided = "majority" if method == "majority" else method
    human_breaks_ties = pl.lit(tie_policy in ("human_fallback", "human_vote")) & human_decisive
    # Resolution order: no scorer votes -> decided by the rule -> split broken by the scorers'
    # margin -> by the human -> split.
    label = (
        pl.when(pl.col("n_scorers") == 0).then(pl.when(human_breaks_ties).then(human))
        .when(decided.is_not_null()).then(decided)
        .when(by_margin.is_not_null()).then(by_margin)
        .when(human_breaks_ties).then(human)
    )
    source = (
        pl.when(pl.col("n_scorers") == 0).then(pl.lit("no_scorer_votes"))
        .when(decided.is_not_null()).then(pl.lit(source_decided))
        .when(by_margin.is_not_null()).then(pl.lit("scorer_margin"))
        .when(human_breaks_ties).then(pl.lit("human_fallback"))
        .otherwise(pl.lit("split"))
    )
    counts = counts.lazy()
    schema = {k: v for k, v in CONSENSUS_SCHEMA.items() if k != "pair_id" or "pair_id" in counts.collect_schema()}
    return (
        counts
        .with_columns(pl.col("n_scorers").fill_null(0), pl.col("votes_for_0").fill_null(0.0))
        .with_columns(vote_fraction=pl.when(n_voters > 0).then(for_0 / n_voters))
        .with_columns(consensus_label=label, consensus_source=source, scorer_label=scorer_label)
        .with_columns(human_agrees=pl.when(human_decisive).then(pl.col("scorer_label") == human))
        .select(list(schema))
        .cast(schema)
        .collect()
    )
