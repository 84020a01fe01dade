"""Per-annotator statistics and reliability for pairwise preference labels.

Statistics (`data-and-scorers.md` §6): tie rate, position (image_0) rate, agreement with the
scorers' majority, agreement with other annotators on the same unordered image pair, and the mean
Adaptive-DPO minority score of the annotator's pairs (`curation.pair_metrics`). Two reliability
estimators (higher = more trustworthy), both always computed; `reliability` holds the one chosen:

- "beta_binomial": the empirical-Bayes posterior mean of the annotator's agreement with the scorer
  majority, under a Beta prior fitted to all annotators by the method of moments (so an annotator
  with 2 labels is pulled toward the population), minus penalties for position bias and excess ties.
- "dawid_skene": a two-coin Dawid-Skene model (Dawid & Skene 1979, Applied Statistics 28(1)) over
  unordered image pairs, with the scorer votes as a soft prior on each pair's winner
  (`dawid_skene_pairs`); reliability = balanced accuracy (sensitivity + specificity) / 2, about 1/2
  both for a spammer and for an annotator who mostly picks the same side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from curation.votes import _frame


RELIABILITY_METHODS = ("beta_binomial", "dawid_skene")
AGREEMENT_WEIGHTINGS = ("vote_margin", "none")
AGREEMENT_REFERENCES = ("scorer_majority", "consensus_label")


@dataclass(frozen=True)
class AnnotatorStatsConfig:
    reliability_method: Literal["beta_binomial", "dawid_skene"] = "beta_binomial"
    """Which estimator fills `reliability` (both are returned in their own columns)."""
    agreement_reference: Literal["scorer_majority", "consensus_label"] = "scorer_majority"
    """Reference for consensus_agreement. "scorer_majority" (votes_for_0 / n_scorers, the human left
    out) is independent of the annotator; "consensus_label" is not under the "human_vote" and
    "human_fallback" tie policies, where the annotator's own label helps decide the consensus."""
    agreement_weighting: Literal["vote_margin", "none"] = "vote_margin"
    """"vote_margin": with the scorer_majority reference, a label's agreement counts with weight
    |2 * votes_for_0 / n_scorers - 1| (1 for a unanimous vote, 1/3 for 2 of 3), so that close scorer
    calls, which are often wrong, matter less. On the embedded sample this raised the AUROC of
    minority + spammer vs reliable annotators (small config, seeds 0-5) from 0.75-1.0 to 0.93-1.0.
    "none": every decisive reference counts 1 (always the case for the consensus_label reference)."""
    prior_strength: float | None = None
    """Beta prior strength alpha + beta (pseudo-labels) for the agreement shrinkage; None = fitted by
    the method of moments, clipped to [min_prior_strength, max_prior_strength]."""
    min_prior_strength: float = 2.0
    """Lower clip: at least the weight of a uniform Beta(1, 1) prior."""
    max_prior_strength: float = 500.0
    """Upper clip, used when annotators look identical (between-annotator variance <= 0)."""
    side_prior_strength: float = 30.0
    """Pseudo-labels pulling left_rate and tie_rate toward the population before the penalties, so a
    few labels cannot make a large penalty (30: a 30-label annotator keeps half of their deviation)."""
    left_penalty: float = 0.25
    """Reliability lost per unit of |shrunk left rate - population left rate|. Agreement already
    catches position bias when image order is random; the penalty guards the case where the scorer
    majority is itself position-correlated. Chosen on the embedded sample (6 small + 3 full seeds):
    1.0 lowered the minority + spammer vs reliable AUROC to 0.86-0.88 on one seed, 0.25 kept it
    >= 0.93 and ranked every position-biased annotator below >= 94 % of reliable ones."""
    tie_penalty: float = 0.25
    """Reliability lost per unit of shrunk tie rate above the population's: ties carry no preference,
    but a tie-prone annotator's decisive labels can still be good, so the penalty is mild."""
    minority_threshold: float = 0.5
    """minority_rate = share of the annotator's pairs with minority_score above this. With the
    default PairMetricsConfig, u > 0.5 means the mean confidence in the label is below 1/2."""
    ds_prior_pseudo_votes: float = 1.0
    """Dawid-Skene prior on a pair's winner: (scorer votes for it + this) / (n_scorers + 2 * this)."""
    ds_accuracy_prior_strength: float = 4.0
    """Pseudo-labels shrinking each annotator's sensitivity/specificity toward the pooled value."""
    ds_max_iter: int = 100
    ds_tol: float = 1e-6
    """Stop when no sensitivity/specificity moves more than this in one iteration."""

    def __post_init__(self) -> None:
        if self.reliability_method not in RELIABILITY_METHODS:
            raise ValueError(f"reliability_method={self.reliability_method!r}; expected one of {RELIABILITY_METHODS}")
        if self.agreement_reference not in AGREEMENT_REFERENCES:
            raise ValueError(f"agreement_reference={self.agreement_reference!r}; expected one of {AGREEMENT_REFERENCES}")
        if self.agreement_weighting not in AGREEMENT_WEIGHTINGS:
            raise ValueError(f"agreement_weighting={self.agreement_weighting!r}; expected one of {AGREEMENT_WEIGHTINGS}")
        if not 0 < self.min_prior_strength <= self.max_prior_strength:
            raise ValueError(f"need 0 < min_prior_strength <= max_prior_strength, got "
                             f"{self.min_prior_strength}, {self.max_prior_strength}")


def beta_prior_strength(successes: np.ndarray, trials: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """Method-of-moments Beta prior for per-annotator rates: (mean mu, strength alpha + beta).

    With p_j = k_j / n_j and theta_j ~ Beta, Var(p_j) = tau^2 + (mu (1 - mu) - tau^2) / n_j, so
    tau^2 = (S - mu (1 - mu) m) / (1 - m) with S the mean squared deviation of p_j from the pooled
    mu and m = mean(1 / n_j); then alpha + beta = mu (1 - mu) / tau^2 - 1, clipped to [lo, hi]
    (hi when tau^2 <= 0: the rates vary no more than binomial noise explains). Trials may be
    fractional (weighted labels): mu pools every annotator, the variance uses those with at least 1
    trial, and with fewer than 2 of them the spread is unknown and the weakest prior (lo) is used."""
    mu = float(successes.sum() / trials.sum()) if trials.sum() > 0 else 0.5
    keep = trials >= 1
    k, n = successes[keep].astype(float), trials[keep].astype(float)
    if n.size < 2:
        return mu, lo
    m = float(np.mean(1.0 / n))
    spread = float(np.mean((k / n - mu) ** 2))
    tau2 = (spread - mu * (1 - mu) * m) / (1 - m) if m < 1 else 0.0
    if tau2 <= 0 or mu in (0.0, 1.0):
        return mu, hi
    return mu, float(np.clip(mu * (1 - mu) / tau2 - 1, lo, hi))


def dawid_skene_pairs(
    worker: np.ndarray, item: np.ndarray, flipped: np.ndarray, chose_0: np.ndarray, prior_first: np.ndarray,
    *, n_workers: int | None = None, accuracy_prior_strength: float = 4.0, max_iter: int = 100, tol: float = 1e-6,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-coin Dawid-Skene EM for pairwise labels, with a soft prior on each item's winner.

    Args (R labels, I items = unordered image pairs, W workers; every label decisive):
        worker: (R,) int worker index in [0, W).
        item: (R,) int item index in [0, I).
        flipped: (R,) bool, the label's image_0 is its item's second image.
        chose_0: (R,) bool, the label picked its own image_0 (the image shown first / on the left).
        prior_first: (I,) prior P(item's first image is better), in (0, 1) (e.g. from scorer votes).
        n_workers: W; default max(worker) + 1. A worker with no label gets the pooled values.

    Model: item i has a latent winner; worker j picks image_0 with probability a_j (sensitivity)
    when image_0 is the better one and image_1 with probability b_j (specificity) when image_1 is,
    so a position bias shows as a_j >> b_j. E-step: the item's log-odds = logit(prior_i) + the sum of
    its labels' log-likelihood ratios. M-step: a_j, b_j = the worker's expected agreement under the
    posterior (MAP, shrunk toward the pooled a, b with `accuracy_prior_strength` pseudo-labels).
    An item labelled once still informs a_j, b_j through its prior: P(pick image_0) = p a + (1 - p)(1 - b).

    Returns:
        sensitivity a (W,), specificity b (W,), posterior P(item's first image is better) (I,).
    """
    if n_workers is None:
        n_workers = int(worker.max()) + 1 if worker.size else 0
    n_items = prior_first.size
    y = chose_0.astype(float)
    orient = np.where(flipped, -1.0, 1.0)  # (R,) maps "label's image_0 better" log-odds to the item's order
    prior_logit = np.log(prior_first) - np.log1p(-prior_first)
    sens, spec = np.full(n_workers, 0.7), np.full(n_workers, 0.7)
    eps, strength = 1e-4, accuracy_prior_strength

    def item_log_odds(sens: np.ndarray, spec: np.ndarray) -> np.ndarray:
        # (R,) log P(label | image_0 better) - log P(label | image_1 better), turned to the item's order
        llr = np.where(y == 1.0, np.log(sens[worker]) - np.log1p(-spec[worker]),
                       np.log1p(-sens[worker]) - np.log(spec[worker])) * orient
        return prior_logit + np.bincount(item, llr, minlength=n_items)  # (I,)

    for _ in range(max_iter):
        logit = item_log_odds(sens, spec)
        q = 1.0 / (1.0 + np.exp(-logit[item] * orient))  # (R,) posterior P(the label's image_0 is better)
        pooled_sens = (q * y).sum() / max(q.sum(), eps)
        pooled_spec = ((1 - q) * (1 - y)).sum() / max((1 - q).sum(), eps)
        new_sens = ((np.bincount(worker, q * y, n_workers) + strength * pooled_sens)
                    / (np.bincount(worker, q, n_workers) + strength)).clip(eps, 1 - eps)
        new_spec = ((np.bincount(worker, (1 - q) * (1 - y), n_workers) + strength * pooled_spec)
                    / (np.bincount(worker, 1 - q, n_workers) + strength)).clip(eps, 1 - eps)
        change = max(np.abs(new_sens - sens).max(initial=0.0), np.abs(new_spec - spec).max(initial=0.0))
        sens, spec = new_sens, new_spec
        if change < tol:
            break
    logit = item_log_odds(sens, spec)
    return sens, spec, 1.0 / (1.0 + np.exp(-logit))


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties
    counting 1/2 (Mann-Whitney U / (n_pos n_neg), with average ranks for tied scores)."""
    scores = np.asarray(scores, dtype=float)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores and positive must be 1-D of one length, got {scores.shape} and {positive.shape}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives, got {n_pos} and {n_neg}")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based rank of each distinct score
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def annotator_stats(
    pairs: pl.DataFrame | pl.LazyFrame,
    consensus: pl.DataFrame | pl.LazyFrame,
    pair_metrics: pl.DataFrame | pl.LazyFrame,
    config: AnnotatorStatsConfig = AnnotatorStatsConfig(),
) -> pl.DataFrame:
    """One row per annotator (non-null user_id of `pairs`), sorted by user_id.

    Args:
        pairs: columns pair_id, user_id, label_0, image_0_id, image_1_id.
        consensus: output of `curation.consensus.consensus` (n_scorers, votes_for_0, consensus_label).
        pair_metrics: output of `curation.pair_metrics.pair_metrics` with label_source="human", so
            that minority_score measures this annotator's label.
        config: see `AnnotatorStatsConfig`.

    Returns columns (rates are null when their denominator is 0):
        n_labels, n_ties, tie_rate (label_0 = 0.5), n_decisive, left_rate (share of decisive labels
        for image_0), n_reference (decisive labels with a decisive reference), consensus_agreement
        (share agreeing with the reference, weighted per config.agreement_weighting),
        agreement_shrunk (its Beta posterior mean, the weights acting as fractional trials),
        peer_agreement (agreeing / all comparisons with other annotators' decisive labels on the same
        unordered image pair), n_peer_pairs (labels with at least one such peer label),
        mean_minority_score, minority_rate, ds_sensitivity (Dawid-Skene P(picks image_0 | image_0 is
        better)), ds_specificity (P(picks image_1 | image_1 is better)), reliability_beta_binomial,
        reliability_dawid_skene, reliability (the chosen one) and reliability_method.
    """
    labels = _frame(pairs, "pairs", ["pair_id", "user_id", "label_0", "image_0_id", "image_1_id"]).select(
        pl.col("pair_id").cast(pl.String), pl.col("user_id").cast(pl.String), pl.col("label_0").cast(pl.Float64),
        "image_0_id", "image_1_id").filter(pl.col("user_id").is_not_null())
    cons = _frame(consensus, "consensus", ["pair_id", "n_scorers", "votes_for_0", "consensus_label"]).select(
        "pair_id", "n_scorers", "votes_for_0", "consensus_label")
    minority = _frame(pair_metrics, "pair_metrics", ["pair_id", "minority_score"]).select("pair_id", "minority_score")
    excess = pl.col("votes_for_0") / pl.col("n_scorers") - 0.5  # null/NaN when no scorer voted
    if config.agreement_reference == "scorer_majority":
        reference = pl.when(pl.col("n_scorers") > 0).then(
            pl.when(excess > 0).then(1.0).when(excess < 0).then(0.0))
    else:
        reference = pl.col("consensus_label")
    by_margin = config.agreement_weighting == "vote_margin" and config.agreement_reference == "scorer_majority"
    reference_weight = (2.0 * excess.abs()) if by_margin else pl.lit(1.0)
    label = pl.col("label_0")
    decisive = label.is_in([0.0, 1.0])
    flip = pl.col("image_0_id") > pl.col("image_1_id")  # the row's image_0 is its item's second image
    rows = (
        labels.join(cons, on="pair_id", how="left").join(minority, on="pair_id", how="left")
        .with_columns(_lo=pl.min_horizontal("image_0_id", "image_1_id"), _hi=pl.max_horizontal("image_0_id", "image_1_id"),
                      _decisive=decisive, _flip=flip, _reference=reference, _weight=reference_weight,
                      _first=decisive & ((label == 1.0) != flip))  # decisive label for the item's first image
        .collect()
    )
    items = rows.select("_lo", "_hi").unique(maintain_order=True).with_row_index("_item")
    workers = rows.select("user_id").unique().sort("user_id").with_row_index("_worker")
    rows = rows.join(items, on=["_lo", "_hi"], maintain_order="left").join(workers, on="user_id", maintain_order="left")

    # Peer agreement: other users' decisive labels on the same item (the user's own excluded).
    n, k = pl.col("_decisive").sum(), pl.col("_first").sum()
    rows = rows.with_columns(_n=n.over("_item"), _k=k.over("_item"), _nu=n.over("_item", "_worker"),
                             _ku=k.over("_item", "_worker"))
    peers_agreeing = pl.when(pl.col("_first")).then(pl.col("_k") - pl.col("_ku")).otherwise(
        (pl.col("_n") - pl.col("_k")) - (pl.col("_nu") - pl.col("_ku")))
    rows = rows.with_columns(_peer_agree=pl.when("_decisive").then(peers_agreeing),
                             _peer_total=pl.when("_decisive").then(pl.col("_n") - pl.col("_nu")))
    has_reference = pl.col("_decisive") & pl.col("_reference").is_not_null()
    per_user = rows.group_by("_worker", "user_id").agg(
        n_labels=pl.len().cast(pl.Int64),
        n_ties=(label == 0.5).sum().cast(pl.Int64),
        n_decisive=pl.col("_decisive").sum().cast(pl.Int64),
        _n_left=(label == 1.0).sum(),
        n_reference=has_reference.sum().cast(pl.Int64),
        _w_reference=pl.col("_weight").filter(has_reference).sum(),
        _w_agree=pl.col("_weight").filter(has_reference & (label == pl.col("_reference"))).sum(),
        _peer_agree=pl.col("_peer_agree").sum(), _peer_total=pl.col("_peer_total").sum(),
        n_peer_pairs=(pl.col("_peer_total") > 0).sum().cast(pl.Int64),
        mean_minority_score=pl.col("minority_score").mean(),
        minority_rate=(pl.col("minority_score") > config.minority_threshold).mean(),
    ).sort("_worker")

    # Empirical-Bayes agreement, position and tie rates (numpy over W annotators).
    agree, n_ref = per_user["_w_agree"].to_numpy().astype(float), per_user["_w_reference"].to_numpy().astype(float)
    mu, strength = beta_prior_strength(agree, n_ref, config.min_prior_strength, config.max_prior_strength)
    if config.prior_strength is not None:
        strength = config.prior_strength
    agreement_shrunk = (agree + mu * strength) / (n_ref + strength)
    n_left, n_dec = per_user["_n_left"].to_numpy().astype(float), per_user["n_decisive"].to_numpy().astype(float)
    n_ties, n_all = per_user["n_ties"].to_numpy().astype(float), per_user["n_labels"].to_numpy().astype(float)
    population_left = n_left.sum() / n_dec.sum() if n_dec.sum() else 0.5
    population_tie = n_ties.sum() / n_all.sum() if n_all.sum() else 0.0
    side = config.side_prior_strength
    left_shrunk = (n_left + side * population_left) / (n_dec + side)
    tie_shrunk = (n_ties + side * population_tie) / (n_all + side)
    reliability_bb = (agreement_shrunk - config.left_penalty * np.abs(left_shrunk - population_left)
                      - config.tie_penalty * np.maximum(tie_shrunk - population_tie, 0.0))

    # Dawid-Skene over decisive labels; the prior on each item's winner comes from the scorer votes.
    decided = rows.filter("_decisive")
    votes_first = pl.when(pl.col("_flip")).then(pl.col("n_scorers") - pl.col("votes_for_0")).otherwise("votes_for_0")
    a = config.ds_prior_pseudo_votes
    item_prior = (
        decided.group_by("_item").agg(_v=votes_first.fill_null(0).mean(), _m=pl.col("n_scorers").fill_null(0).mean())
        .sort("_item").select("_item", _prior=(pl.col("_v") + a) / (pl.col("_m") + 2 * a))
    )
    item_code = decided.join(item_prior.with_row_index("_code"), on="_item", maintain_order="left")["_code"]
    sens, spec, _ = dawid_skene_pairs(
        decided["_worker"].to_numpy().astype(np.int64), item_code.to_numpy().astype(np.int64),
        decided["_flip"].to_numpy(), (decided["label_0"] == 1.0).to_numpy(),
        np.clip(item_prior["_prior"].to_numpy(), 1e-6, 1 - 1e-6), n_workers=per_user.height,
        accuracy_prior_strength=config.ds_accuracy_prior_strength, max_iter=config.ds_max_iter, tol=config.ds_tol)
    ds_sens, ds_spec = sens[per_user["_worker"].to_numpy()], spec[per_user["_worker"].to_numpy()]
    reliability_ds = (ds_sens + ds_spec) / 2

    rate = lambda num, den: pl.when(pl.col(den) > 0).then(pl.col(num) / pl.col(den))  # noqa: E731
    chosen = reliability_bb if config.reliability_method == "beta_binomial" else reliability_ds
    return per_user.with_columns(
        tie_rate=rate("n_ties", "n_labels"), left_rate=rate("_n_left", "n_decisive"),
        consensus_agreement=rate("_w_agree", "_w_reference"), agreement_shrunk=pl.Series(agreement_shrunk),
        peer_agreement=rate("_peer_agree", "_peer_total"),
        ds_sensitivity=pl.Series(ds_sens), ds_specificity=pl.Series(ds_spec),
        reliability_beta_binomial=pl.Series(reliability_bb), reliability_dawid_skene=pl.Series(reliability_ds),
        reliability=pl.Series(chosen), reliability_method=pl.lit(config.reliability_method),
    ).select(
        "user_id", "n_labels", "n_ties", "tie_rate", "n_decisive", "left_rate", "n_reference", "consensus_agreement",
        "agreement_shrunk", "peer_agreement", "n_peer_pairs", "mean_minority_score", "minority_rate",
        "ds_sensitivity", "ds_specificity", "reliability_beta_binomial", "reliability_dawid_skene",
        "reliability", "reliability_method",
    )
