"""Multi-scorer consensus labels: BalancedDPO's majority vote over preference scorers.

BalancedDPO (Tamboli et al., arXiv 2503.12575, TMLR 2026) relabels each pair by "a majority-vote
consensus over multiple preference scorers". Its tie rule and whether the human label votes are
not published (`methods.md` §3.2), so both are options here (`methods.md` §3.3, step 2):

    y = 1[ sum_m v_m > M / 2 ]     v_m = 1 if scorer m prefers image_0, 0 if image_1, 0.5 if tied

Tie policies, for a split vote (vote fraction exactly 1/2):
- "human_fallback": use the human label_0;
- "drop": no label (consensus_label null, consensus_source "split");
- "human_vote": the human label_0 is one more voter (with M = 4 scorers: 5 voters, no ties unless
  a scorer or the human is itself tied).
A human tie (label_0 = 0.5) is a half vote each way under "human_vote" and cannot break a split
under "human_fallback": the pair then gets no label. Pairs with no scorer vote at all keep the
human label (consensus_source "no_scorer_votes") except under "drop".

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

from curation.votes import as_lazy


TiePolicy = Literal["human_fallback", "drop", "human_vote"]
Method = Literal["majority", "random_scorer", "vanilla_sum", "normalized_sum"]
TIE_POLICIES = ("human_fallback", "drop", "human_vote")
METHODS = ("majority", "random_scorer", "vanilla_sum", "normalized_sum")

CONSENSUS_SCHEMA = {
    "pair_id": pl.String, "n_scorers": pl.Int64, "votes_for_0": pl.Float64, "vote_fraction": pl.Float64,
    "consensus_label": pl.Float64, "human_label": pl.Float64, "human_agrees": pl.Boolean,
    "consensus_source": pl.String,
}


def _sign_label(x: pl.Expr) -> pl.Expr:
    """1.0 if x > 0, 0.0 if x < 0, null if x is 0 or null: a decisive label or none."""
    return pl.when(x > 0).then(1.0).when(x < 0).then(0.0).otherwise(None)


def consensus(
    votes: pl.DataFrame | pl.LazyFrame,
    pairs: pl.DataFrame | pl.LazyFrame,
    scorers: Collection[str] | None = None,
    tie_policy: TiePolicy = "human_vote",
    *,
    method: Method = "majority",
    seed: int = 0,
) -> pl.DataFrame:
    """One row per pair of `pairs`, in the order of `pairs`.

    Args:
        votes: output of `curation.votes.compute_votes`.
        pairs: columns pair_id, label_0 (the human label: 1, 0 or 0.5 for a tie).
        scorers: the scorers that vote; None = every scorer in `votes`.
        tie_policy: "human_fallback", "drop" or "human_vote" (module docstring).
        method: "majority" (BalancedDPO) or a baseline: "random_scorer", "vanilla_sum", "normalized_sum".
        seed: seed of the "random_scorer" choice.

    Returns:
        DataFrame with
        - n_scorers: scorers with a vote on the pair;
        - votes_for_0: scorer votes for image_0 (a tied scorer counts 1/2), human excluded;
        - vote_fraction: share of voters for image_0, the human included under "human_vote";
          null when nobody voted;
        - consensus_label: 1.0 (image_0), 0.0 (image_1) or null (no decisive label);
        - human_label: label_0;
        - human_agrees: consensus_label == human_label; null when either is null or the human tied;
        - consensus_source: "majority" / the baseline's name (decided by the rule),
          "human_fallback" (tie broken by the human), "split" (tie left unbroken),
          "no_scorer_votes" (no scorer voted: human label, or null under "drop").
    """
    if tie_policy not in TIE_POLICIES:
        raise ValueError(f"unknown tie_policy {tie_policy!r}; expected one of {TIE_POLICIES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    vote_frame = as_lazy(votes, "votes", ["pair_id", "scorer", "vote", "margin", "score_0", "score_1"])
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
                                                  **rule)
    human = pl.col("human_label")
    human_decisive = human.is_in([0.0, 1.0])
    human_vote = tie_policy == "human_vote"
    n_voters = pl.col("n_scorers") + (human.is_not_null().cast(pl.Int64) if human_vote else 0)
    for_0 = pl.col("votes_for_0") + (human.fill_null(0.0) if human_vote else 0.0)
    decided = _sign_label(pl.col("vote_fraction") - 0.5) if method == "majority" else _sign_label(pl.col("_rule"))
    source_decided = "majority" if method == "majority" else method
    human_breaks_ties = pl.lit(tie_policy != "drop") & human_decisive
    # Resolution order: no scorer votes -> decided by the rule -> tie broken by the human -> split.
    label = (
        pl.when(pl.col("n_scorers") == 0).then(pl.when(human_breaks_ties).then(human))
        .when(decided.is_not_null()).then(decided)
        .when(human_breaks_ties).then(human)
    )
    source = (
        pl.when(pl.col("n_scorers") == 0).then(pl.lit("no_scorer_votes"))
        .when(decided.is_not_null()).then(pl.lit(source_decided))
        .when(human_breaks_ties).then(pl.lit("human_fallback"))
        .otherwise(pl.lit("split"))
    )
    return (
        pair_frame.join(per_pair, on="pair_id", how="left", maintain_order="left")
        .with_columns(pl.col("n_scorers").fill_null(0), pl.col("votes_for_0").fill_null(0.0))
        .with_columns(vote_fraction=pl.when(n_voters > 0).then(for_0 / n_voters))
        .with_columns(consensus_label=label, consensus_source=source)
        .with_columns(human_agrees=pl.when(human_decisive).then(pl.col("consensus_label") == human))
        .select(list(CONSENSUS_SCHEMA))
        .cast(CONSENSUS_SCHEMA)
        .collect()
    )
