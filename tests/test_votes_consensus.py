"""compute_votes and consensus against hand-computed oracles."""
import math

import polars as pl
import pytest

from prefcurate.curation.labels.consensus import CONSENSUS_SCHEMA, consensus
from prefcurate.curation.labels.votes import PROMPT_FREE_PROMPT_ID, VOTES_SCHEMA, compute_votes, missing_vote_counts


# Three pairs over images x, y, z. "clip" is prompt-dependent, higher is better; "blur" is
# prompt-free (stored under PROMPT_FREE_PROMPT_ID), lower is better, and has no score for z.
PAIRS = pl.DataFrame({
    "pair_id": ["a", "b", "c"],
    "prompt_id": ["p", "p", "q"],
    "image_0_id": ["x", "y", "x"],
    "image_1_id": ["y", "z", "z"],
    "label_0": [1.0, 0.0, 0.5],
})
SCORES = pl.DataFrame({
    "image_id": ["x", "y", "z", "x", "z", "x", "y"],
    "prompt_id": ["p", "p", "p", "q", "q", PROMPT_FREE_PROMPT_ID, PROMPT_FREE_PROMPT_ID],
    "scorer": ["clip"] * 5 + ["blur"] * 2,
    "score": [0.30, 0.10, 0.20, 0.50, 0.50, 2.0, 5.0],
})
SCORERS = {"clip": True, "blur": False}


def _by_key(votes: pl.DataFrame) -> dict[tuple[str, str], dict]:
    return {(r["pair_id"], r["scorer"]): r for r in votes.iter_rows(named=True)}


def test_votes_margins_signs_and_rms_normalisation():
    votes = compute_votes(PAIRS, SCORES, SCORERS, prompt_free=["blur"])
    assert votes.schema == pl.Schema(VOTES_SCHEMA)
    rows = _by_key(votes)
    assert set(rows) == {("a", "clip"), ("b", "clip"), ("c", "clip"), ("a", "blur")}  # z has no blur score
    # clip margins 0.2, -0.1, 0 -> rms = sqrt(0.05 / 3)
    rms = math.sqrt((0.2**2 + 0.1**2 + 0.0) / 3)
    assert rows["a", "clip"]["margin"] == pytest.approx(0.2) and rows["a", "clip"]["vote"] == 1.0
    assert rows["b", "clip"]["margin"] == pytest.approx(-0.1) and rows["b", "clip"]["vote"] == 0.0
    assert rows["c", "clip"]["margin"] == 0.0 and rows["c", "clip"]["vote"] == 0.5
    assert rows["a", "clip"]["normalized_margin"] == pytest.approx(0.2 / rms)
    assert rows["b", "clip"]["normalized_margin"] == pytest.approx(-0.1 / rms)
    # blur is lower-is-better: x (2.0) beats y (5.0), so the margin is +3 and image_0 gets the vote
    blur = rows["a", "blur"]
    assert (blur["score_0"], blur["score_1"], blur["margin"], blur["vote"]) == (2.0, 5.0, 3.0, 1.0)
    assert blur["normalized_margin"] == pytest.approx(1.0)  # its only margin is its own rms


def test_votes_flipping_higher_is_better_flips_every_sign():
    up = compute_votes(PAIRS, SCORES, {"clip": True})
    down = compute_votes(PAIRS, SCORES, {"clip": False})
    assert down["margin"].to_list() == [-m for m in up["margin"].to_list()]
    assert down["vote"].to_list() == [1.0 - v for v in up["vote"].to_list()]


def test_votes_mad_spread():
    votes = compute_votes(PAIRS, SCORES, {"clip": True}, spread="mad")
    # median |margin| of (0.2, 0.1, 0) is 0.1, so the spread is 1.4826 * 0.1
    assert _by_key(votes)["a", "clip"]["normalized_margin"] == pytest.approx(0.2 / 0.14826)


def test_votes_mad_falls_back_to_rms_when_most_margins_tie():
    # z at prompt p scored like y: clip margins become 0.2, 0, 0, so median |margin| = 0
    scores = SCORES.with_columns(score=pl.when((pl.col("image_id") == "z") & (pl.col("prompt_id") == "p"))
                                 .then(0.10).otherwise("score"))
    rows = _by_key(compute_votes(PAIRS, scores, {"clip": True}, spread="mad"))
    assert [rows[p, "clip"]["margin"] for p in "abc"] == pytest.approx([0.2, 0.0, 0.0])
    assert rows["a", "clip"]["normalized_margin"] == pytest.approx(0.2 / math.sqrt(0.04 / 3))


def test_prompt_dependent_scorer_does_not_join_across_prompts():
    # Pair c is at prompt q; clip scores at prompt p for x and z must not be used for it.
    scores = SCORES.filter(pl.col("prompt_id") != "q")
    rows = _by_key(compute_votes(PAIRS, scores, SCORERS, prompt_free=["blur"]))
    assert ("c", "clip") not in rows and ("a", "clip") in rows


def test_missing_vote_counts():
    votes = compute_votes(PAIRS, SCORES, SCORERS, prompt_free=["blur"])
    counts = dict(missing_vote_counts(PAIRS, votes, list(SCORERS)).iter_rows())
    assert counts == {"clip": 0, "blur": 2}


def test_votes_reject_duplicate_scores_and_bad_arguments():
    with pytest.raises(ValueError, match="duplicate"):
        compute_votes(PAIRS, pl.concat([SCORES, SCORES.head(1)]), SCORERS, prompt_free=["blur"])
    with pytest.raises(ValueError, match="missing column"):
        compute_votes(PAIRS.drop("prompt_id"), SCORES, SCORERS)
    with pytest.raises(ValueError, match="not in scorers"):
        compute_votes(PAIRS, SCORES, {"clip": True}, prompt_free=["blur"])
    with pytest.raises(ValueError, match="spread"):
        compute_votes(PAIRS, SCORES, SCORERS, spread="std")


def test_votes_empty_in_empty_out():
    votes = compute_votes(PAIRS.clear(), SCORES.lazy(), SCORERS, prompt_free=["blur"])
    assert votes.height == 0 and votes.schema == pl.Schema(VOTES_SCHEMA)


# --- consensus ---

def _votes(rows: dict[str, list[float]], margins: dict[str, list[float]] | None = None) -> pl.DataFrame:
    """Votes frame from {pair_id: [vote of scorer w, x, y, z, ...]} (margins default to vote - 0.5)."""
    records = []
    for pair_id, votes in rows.items():
        for i, vote in enumerate(votes):
            margin = margins[pair_id][i] if margins else vote - 0.5
            records.append({"pair_id": pair_id, "scorer": "wxyz"[i], "score_0": margin, "score_1": 0.0,
                            "margin": margin, "vote": vote, "normalized_margin": margin})
    return pl.DataFrame(records, schema=VOTES_SCHEMA)


def _one(frame: pl.DataFrame, pair_id: str) -> dict:
    return frame.filter(pl.col("pair_id") == pair_id).row(0, named=True)


def test_unanimous_vote():
    votes = _votes({"u": [1.0, 1.0, 1.0, 1.0]})
    for policy in ("human_fallback", "drop", "human_vote", "scorer_margin"):
        row = _one(consensus(votes, pl.DataFrame({"pair_id": ["u"], "label_0": [0.0]}), tie_policy=policy), "u")
        assert (row["n_scorers"], row["votes_for_0"], row["consensus_label"]) == (4, 4.0, 1.0)
        assert row["consensus_source"] == "majority" and row["human_agrees"] is False
        assert row["vote_fraction"] == (0.8 if policy == "human_vote" else 1.0)  # human_vote: 4 of 5 voters


@pytest.mark.parametrize(("policy", "label", "source", "fraction", "agrees"), [
    ("human_fallback", 0.0, "human_fallback", 0.5, None),  # the human decided: not counted as agreement
    ("drop", None, "split", 0.5, None),
    ("human_vote", 0.0, "majority", 0.4, None),  # 2 scorers + 0 human of 5 voters for image_0
    ("scorer_margin", 1.0, "scorer_margin", 0.5, False),  # mean margin (2 + 2 - 0.5 - 0.5) / 4 > 0
])
def test_two_two_split_under_each_tie_policy(policy, label, source, fraction, agrees):
    # normalized margins: image_0's two voters are sure (+2 each), image_1's two barely (-0.5 each)
    votes = _votes({"s": [1.0, 1.0, 0.0, 0.0]}, margins={"s": [2.0, 2.0, -0.5, -0.5]})
    row = _one(consensus(votes, pl.DataFrame({"pair_id": ["s"], "label_0": [0.0]}), tie_policy=policy), "s")
    assert (row["consensus_label"], row["consensus_source"]) == (label, source)
    assert row["vote_fraction"] == pytest.approx(fraction) and row["votes_for_0"] == 2.0
    assert row["human_agrees"] is agrees
    assert row["scorer_label"] == (1.0 if policy == "scorer_margin" else None)


def test_default_is_the_paper_form_scorers_only_and_splits_dropped():
    # 3 scorers split 2-1 for image_0, human says image_1: the human neither votes nor decides.
    votes = _votes({"a": [1.0, 1.0, 0.0], "s": [1.0, 1.0, 0.0, 0.0]})
    pairs = pl.DataFrame({"pair_id": ["a", "s"], "label_0": [0.0, 0.0]})
    out = consensus(votes, pairs)
    assert out["consensus_label"].to_list() == [1.0, None]
    assert out["consensus_source"].to_list() == ["majority", "split"]
    assert out["human_agrees"].to_list() == [False, None]
    # under human_vote the human turns the 2-1 into a 2-2 split it then wins; agreement is still
    # measured against the scorers' own 2-1 label, so the human cannot agree with itself
    voted = consensus(votes, pairs, tie_policy="human_vote")
    assert voted["consensus_label"].to_list() == [0.0, 0.0]
    assert voted["consensus_source"].to_list() == ["human_fallback", "majority"]
    assert voted["human_agrees"].to_list() == [False, None]


@pytest.mark.parametrize("policy", ["human_fallback", "drop", "human_vote"])
def test_split_with_a_human_tie_stays_unlabelled(policy):
    votes = _votes({"s": [1.0, 1.0, 0.0, 0.0]})
    row = _one(consensus(votes, pl.DataFrame({"pair_id": ["s"], "label_0": [0.5]}), tie_policy=policy), "s")
    assert (row["consensus_label"], row["consensus_source"], row["human_agrees"]) == (None, "split", None)
    assert row["vote_fraction"] == 0.5  # human_vote: 2 + 0.5 of 5


def test_pair_without_votes_keeps_human_label_except_under_drop():
    pairs = pl.DataFrame({"pair_id": ["n"], "label_0": [1.0]})
    empty = _votes({})
    assert _one(consensus(empty, pairs, tie_policy="human_fallback"), "n")["consensus_label"] == 1.0
    assert _one(consensus(empty, pairs, tie_policy="human_vote"), "n")["vote_fraction"] == 1.0
    row = _one(consensus(empty, pairs, tie_policy="drop"), "n")
    assert (row["n_scorers"], row["consensus_label"], row["consensus_source"]) == (0, None, "no_scorer_votes")


def test_scorer_subset_and_output_order():
    votes = _votes({"b": [1.0, 0.0, 0.0], "a": [1.0, 1.0, 0.0]})
    pairs = pl.DataFrame({"pair_id": ["a", "b"], "label_0": [1.0, 1.0]})
    out = consensus(votes, pairs, scorers=["w"], tie_policy="drop")
    assert out["pair_id"].to_list() == ["a", "b"] and out["n_scorers"].to_list() == [1, 1]
    assert out["consensus_label"].to_list() == [1.0, 1.0]


def test_vanilla_sum_follows_the_biggest_margin_not_the_head_count():
    votes = _votes({"v": [1.0, 0.0, 0.0]}, margins={"v": [3.0, -1.0, -1.0]})
    pairs = pl.DataFrame({"pair_id": ["v"], "label_0": [0.0]})
    assert _one(consensus(votes, pairs, tie_policy="drop"), "v")["consensus_label"] == 0.0
    row = _one(consensus(votes, pairs, tie_policy="drop", method="vanilla_sum"), "v")
    assert (row["consensus_label"], row["consensus_source"]) == (1.0, "vanilla_sum")


def test_normalized_sum_rescales_each_scorer():
    # Scorer "big" has scores 0, 100 (std 50 over the 4 image appearances); "small" 0, 1 (std 0.5).
    # Pair q: big +10 (0.2 std), small -0.5 (-1 std): vanilla says image_0, normalized says image_1.
    votes = pl.DataFrame({
        "pair_id": ["p", "p", "q", "q"], "scorer": ["big", "small", "big", "small"],
        "score_0": [100.0, 1.0, 60.0, 0.0], "score_1": [0.0, 0.0, 50.0, 0.5],
    }).with_columns(margin=pl.col("score_0") - pl.col("score_1"), vote=pl.lit(0.5), normalized_margin=pl.lit(0.0))
    pairs = pl.DataFrame({"pair_id": ["p", "q"], "label_0": [0.5, 0.5]})
    vanilla = consensus(votes, pairs, tie_policy="drop", method="vanilla_sum")
    normalized = consensus(votes, pairs, tie_policy="drop", method="normalized_sum")
    assert vanilla["consensus_label"].to_list() == [1.0, 1.0]
    assert normalized["consensus_label"].to_list() == [1.0, 0.0]


def test_random_scorer_picks_one_vote_per_pair_reproducibly():
    # Only scorer w votes for image_0: about a third of the pairs should follow it.
    n = 600
    votes = _votes({f"p{i}": [1.0, 0.0, 0.0] for i in range(n)})
    pairs = pl.DataFrame({"pair_id": [f"p{i}" for i in range(n)], "label_0": [0.5] * n})
    first = consensus(votes, pairs, tie_policy="drop", method="random_scorer", seed=1)
    again = consensus(votes, pairs, tie_policy="drop", method="random_scorer", seed=1)
    other = consensus(votes, pairs, tie_policy="drop", method="random_scorer", seed=2)
    assert first.equals(again) and not first.equals(other)
    share = first["consensus_label"].mean()
    assert 0.25 < share < 0.42 and first["consensus_source"].unique().to_list() == ["random_scorer"]


def test_consensus_rejects_unknown_options_and_empty_in_empty_out():
    votes, pairs = _votes({}), pl.DataFrame({"pair_id": [], "label_0": []}, schema={"pair_id": pl.String,
                                                                                     "label_0": pl.Float64})
    with pytest.raises(ValueError, match="tie_policy"):
        consensus(votes, pairs, tie_policy="coin_flip")
    with pytest.raises(ValueError, match="method"):
        consensus(votes, pairs, method="borda")
    out = consensus(votes, pairs)
    assert out.height == 0 and out.schema == pl.Schema(CONSENSUS_SCHEMA)


def test_votes_feed_consensus_end_to_end():
    votes = compute_votes(PAIRS, SCORES, SCORERS, prompt_free=["blur"])
    out = consensus(votes, PAIRS, tie_policy="human_fallback")
    # a: clip 1, blur 1 -> image_0; b: clip 0 -> image_1; c: clip tie -> split, human tie -> no label
    assert out["consensus_label"].to_list() == [1.0, 0.0, None]
    assert out["consensus_source"].to_list() == ["majority", "majority", "split"]
    assert out["human_agrees"].to_list() == [True, True, None]
    assert out["scorer_label"].to_list() == [1.0, 0.0, None]


def test_wide_votes_give_the_long_forms_rows_counts_and_sums():
    """The curate stage's wide form (WideVotes, consensus_from_counts, wide_sums) against the long forms
    (vote_rows, consensus, pair_metrics) on pairs with a missing score, a lower-is-better scorer, a
    scorer whose every margin is 0 (spread 0), an exact tie and two infinite scores (a NaN margin)."""
    import numpy as np
    from polars.testing import assert_frame_equal

    from prefcurate.curation.labels.consensus import consensus_from_counts
    from prefcurate.curation.labels.pair_metrics import (
        PairMetricsConfig, pair_metrics, pair_metrics_from_sums, wide_sums,
    )
    from prefcurate.curation.labels.votes import WideVotes, vote_rows

    inf = math.inf
    wide = pl.DataFrame({
        "pair_id": ["a", "b", "c", "d", "e"], "label_0": [1.0, 0.0, 0.5, None, 1.0],
        "_s0_0": [0.3, 0.1, None, 0.2, inf], "_s0_1": [0.1, 0.4, 0.2, 0.2, inf],  # up; c missing, d tie, e NaN
        "_s1_0": [2.0, 5.0, 1.0, 3.0, 0.5], "_s1_1": [5.0, 2.0, 1.5, 1.0, 0.5],  # down (lower is better)
        "_s2_0": [1.0, 1.0, 1.0, None, 1.0], "_s2_1": [1.0, 1.0, 1.0, 1.0, 1.0],  # every margin 0
    })
    scorers = {"up": True, "down": False, "flat": True}
    spreads = {"up": 0.2, "down": 2.5, "flat": 0.0}
    want = vote_rows(wide, scorers, spreads)
    votes = WideVotes.from_arrow(wide.to_arrow(), scorers, spreads)
    got = pl.from_arrow(votes.table(wide.to_arrow().column("pair_id")))
    assert_frame_equal(got, want)  # bit for bit, NaN margin and its 0.5 vote included
    ids = wide.to_arrow().column("pair_id").combine_chunks()  # an Array, as curate passes them
    assert_frame_equal(pl.from_arrow(votes.table(ids)), want)
    assert want.filter(pl.col("margin").is_nan())["vote"].to_list() == [0.5]

    pairs = wide.select("pair_id", "label_0")
    for policy in ("drop", "scorer_margin", "human_fallback", "human_vote"):
        counts = pl.DataFrame({"pair_id": pairs["pair_id"], "human_label": pairs["label_0"], **votes.counts()})
        assert_frame_equal(consensus_from_counts(counts, policy), consensus(want, pairs, tie_policy=policy))
    config = PairMetricsConfig()
    sums = pl.DataFrame({"pair_id": pairs["pair_id"], "human": pairs["label_0"], "label": pairs["label_0"],
                         **wide_sums(votes.normalized_margin, votes.voted, config)})
    assert_frame_equal(pair_metrics_from_sums(sums, config), pair_metrics(want, pairs, config))
    assert np.array_equal(votes.counts()["n_scorers"], [3, 3, 2, 2, 3])
