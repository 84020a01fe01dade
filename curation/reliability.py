"""Label reliability: the posterior probability that a pair's human label is right.

One two-coin Dawid-Skene model (Dawid & Skene 1979, Applied Statistics 28(1); fitted by
`curation.annotators.dawid_skene_pairs`) holds every voter as an annotator: the human annotators and
the preference scorers. Items are unordered image pairs, so several people labelling the same two
images inform each other. Voter j has a sensitivity a_j = P(says image_0 | image_0 better) and a
specificity b_j = P(says image_1 | image_1 better); a position-biased clicker has a_j >> b_j.

A label "image_0" by voter j is evidence log a_j/(1 - b_j) toward image_0; a label "image_1" is
log (1 - a_j)/b_j (negative: toward image_1). With L0 = logit(prior) and the pair's other evidence
E (the scorers' calibrated log-odds S plus the other humans' labels on the same images, all toward
image_0), Bayes' rule in log-odds space gives for the human label y of annotator j:

    lambda_j(y) = log a_j - log(1 - b_j)       if y = image_0
                = log(1 - a_j) - log b_j       if y = image_1
    P(image_0 better | everything) = sigmoid(L0 + E + lambda_j(y))
    posterior (label right) = sigmoid(+(L0 + E + lambda_j(y)))   if y = image_0
                            = sigmoid(-(L0 + E + lambda_j(y)))   if y = image_1

Checks (tests/test_curate_snapshot.py): a perfect annotator (a = b = 1) gives posterior 1; a
coin-flip annotator (a = 1 - b, e.g. a spammer 1/2, 1/2 or an always-left clicker 1, 0) gives
lambda = 0, the scorer posterior; a left-biased annotator's "left" is weaker evidence than its
"right".

Calibrated consensus. S = sum over the scorers m that voted of lambda_m(vote_m): BalancedDPO's vote
(Tamboli et al., arXiv 2503.12575) with each scorer weighted by its estimated reliability instead of
one vote each; calibrated_label = 1[L0 + S > 0]. The equal-vote form stays the `consensus` table's
(`curation.consensus`, the paper baseline).

Minority taste. A consistent annotator whose taste departs from the majority's disagrees with the
scorers and the other humans on exactly the pairs where tastes differ, so it gets a + b < 1 and
its labels point (correctly, for the majority taste) the other way: the posterior says its label is
probably wrong. The `reliability` snapshot therefore down-weights such annotators as noise for a
majority-taste model; `SnapshotPolicy.annotator_group` keeps a group's own labels as a separate
snapshot instead (curation/snapshot.py). Measured on the embedded sample (seed 0, pixel scorers):
the planted minority's decisive labels agree with the majority truth on 18 % and with their own
taste on 84 % of pairs; their mean posterior is 0.32 (reliable annotators 0.90, spammers 0.47,
position-biased 0.50), so 82 of their 265 pairs stay in the default snapshot, while the group
snapshot of the minority annotators keeps all 265, of which 84 % point at the minority's better image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from curation.annotators import dawid_skene_pairs
from curation.votes import as_lazy


ANONYMOUS = "\x00anonymous"  # pseudo-annotator of labels without a user_id: one shared confusion

LABEL_RELIABILITY_SCHEMA = {
    "pair_id": pl.String, "scorer_log_odds": pl.Float64, "calibrated_label": pl.Float64,
    "peer_log_odds": pl.Float64, "label_log_odds": pl.Float64, "label_posterior": pl.Float64,
}
SCORER_RELIABILITY_SCHEMA = {
    "scorer": pl.String, "n_votes": pl.Int64, "sensitivity": pl.Float64, "specificity": pl.Float64,
    "reliability": pl.Float64, "log_odds_for_0": pl.Float64, "log_odds_for_1": pl.Float64,
    "agreement_with_humans": pl.Float64,
}


@dataclass(frozen=True)
class LabelModelConfig:
    prior_first: float = 0.5
    """Prior P(an item's first image is better). Items order their images by id, which carries no
    information about quality, so the prior is flat."""
    accuracy_prior_strength: float = 4.0
    """Pseudo-labels shrinking each voter's a, b toward the pooled values (as the annotators table):
    an annotator with 3 labels cannot get a = 1; a scorer with thousands of votes is unaffected."""
    use_peers: bool = True
    """Other annotators' labels on the same two images count as evidence (Pick-a-Pic repeats pairs)."""
    max_abs_log_odds: float = 12.0
    """Clip of every log-odds (sigmoid(12) = 1 - 6e-6): a and b are clipped at 1e-4 by the fit, and a
    sum over several near-perfect voters would otherwise make posteriors of exactly 0 or 1."""
    max_iter: int = 100
    tol: float = 1e-5

    def __post_init__(self) -> None:
        if not 0 < self.prior_first < 1 or self.accuracy_prior_strength < 0 or self.max_abs_log_odds <= 0:
            raise ValueError(f"need 0 < prior_first < 1, accuracy_prior_strength >= 0 and max_abs_log_odds > 0; got "
                             f"{self.prior_first}, {self.accuracy_prior_strength}, {self.max_abs_log_odds}")


def log_likelihood_ratio(sensitivity: np.ndarray, specificity: np.ndarray, chose_0: np.ndarray) -> np.ndarray:
    """lambda(y): evidence of one label toward image_0 (module docstring), in nats; same-shape arrays.
    log a/(1 - b) for "image_0", log (1 - a)/b for "image_1"; a, b are clipped to [1e-12, 1 - 1e-12]."""
    a = np.clip(np.asarray(sensitivity, dtype=float), 1e-12, 1 - 1e-12)
    b = np.clip(np.asarray(specificity, dtype=float), 1e-12, 1 - 1e-12)
    return np.where(np.asarray(chose_0, dtype=bool), np.log(a) - np.log1p(-b), np.log1p(-a) - np.log(b))


def label_posterior(other_log_odds: np.ndarray, sensitivity: np.ndarray, specificity: np.ndarray,
                    chose_0: np.ndarray) -> np.ndarray:
    """P(the label is right) = sigmoid(+-(E + lambda(y))), + for a label "image_0", - for "image_1".

    Args (same shapes): other_log_odds E, all other evidence toward image_0 (prior, scorers,
    peers); sensitivity a and specificity b of the label's annotator; chose_0 = the label is image_0.
    """
    chose_0 = np.asarray(chose_0, dtype=bool)
    total = np.asarray(other_log_odds, dtype=float) + log_likelihood_ratio(sensitivity, specificity, chose_0)
    return 1.0 / (1.0 + np.exp(-np.where(chose_0, total, -total)))


def normalise_weights(weight: np.ndarray, trusted: np.ndarray) -> np.ndarray:
    """weight / mean(weight over the trusted pairs), so that trusted pairs average 1 and only the
    suspect ones are down-weighted (a uniform rescaling would only change the learning rate). No
    trusted pair (or a zero mean): the pairs' own mean is used; an empty input stays empty."""
    weight, trusted = np.asarray(weight, dtype=float), np.asarray(trusted, dtype=bool)
    if weight.size == 0:
        return weight
    mean = weight[trusted].mean() if trusted.any() else weight.mean()
    return weight / mean if mean > 0 else weight


def label_reliability(
    pairs: pl.DataFrame | pl.LazyFrame,
    votes: pl.DataFrame | pl.LazyFrame,
    config: LabelModelConfig = LabelModelConfig(),
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Fit the joint Dawid-Skene model; return (per-pair frame, per-scorer frame).

    Args:
        pairs: columns pair_id, user_id, label_0, image_0_id, image_1_id (lake pairs, ids resolved).
        votes: output of `curation.votes.compute_votes` (pair_id, scorer, vote).

    Returns:
        per pair, in the order of `pairs` (LABEL_RELIABILITY_SCHEMA): scorer_log_odds L0 + S toward
        image_0 (null without a decisive scorer vote), calibrated_label (1 / 0 / null), peer_log_odds
        (the other humans' evidence on the same images, 0 when none or use_peers is off),
        label_log_odds (the label's own lambda toward its chosen image) and label_posterior (P(label
        right); null for ties and missing labels);
        per scorer, sorted by name (SCORER_RELIABILITY_SCHEMA): n_votes (decisive, one per item),
        sensitivity, specificity, reliability (a + b) / 2, log_odds_for_0 / _for_1 (the weight of a
        vote either way) and agreement_with_humans (share of decisive human labels it agrees with).
    """
    labels = as_lazy(pairs, "pairs", ["pair_id", "user_id", "label_0", "image_0_id", "image_1_id"]).select(
        pl.col("pair_id").cast(pl.String), pl.col("user_id").cast(pl.String).fill_null(ANONYMOUS),
        pl.col("label_0").cast(pl.Float64),
        _flip=pl.col("image_0_id") > pl.col("image_1_id"),
        _lo=pl.min_horizontal("image_0_id", "image_1_id"), _hi=pl.max_horizontal("image_0_id", "image_1_id"),
    ).collect()
    vote_frame = as_lazy(votes, "votes", ["pair_id", "scorer", "vote"]).select(
        pl.col("pair_id").cast(pl.String), "scorer", "vote").filter(pl.col("vote").is_in([0.0, 1.0])).collect()
    n_pairs = labels.height
    pair_item = _dense_codes(labels.select("_lo", "_hi"))  # (P,) unordered image pair of each pair row
    n_items = int(pair_item.max()) + 1 if n_pairs else 0
    pair_flip = labels["_flip"].to_numpy().astype(bool)
    label_0 = labels["label_0"].to_numpy()
    is_decisive = (label_0 == 0.0) | (label_0 == 1.0)

    # (V,) the pair row of each decisive scorer vote; then one vote per (item, scorer)
    ids = _dense_codes(pl.concat([labels.select("pair_id"), vote_frame.select("pair_id")]))
    row_of_id = np.full(int(ids.max()) + 1 if ids.size else 0, -1, dtype=np.int64)
    row_of_id[ids[:n_pairs]] = np.arange(n_pairs)
    vote_row = row_of_id[ids[n_pairs:]] if ids.size else np.zeros(0, np.int64)
    scorers = sorted(vote_frame["scorer"].unique().to_list())
    scorer_code = vote_frame["scorer"].replace_strict({m: k for k, m in enumerate(scorers)},
                                                      return_dtype=pl.Int64).to_numpy().astype(np.int64)
    vote_0 = (vote_frame["vote"] == 1.0).to_numpy().astype(bool)
    known = vote_row >= 0
    vote_row, scorer_code, vote_0 = vote_row[known], scorer_code[known], vote_0[known]
    # One vote per (item, scorer): the vote on the item's pair with the smallest pair_id. The pairs of an
    # item may show its images either way round, and the two-coin model reads (vote, orientation) as
    # different labels, so "the first vote in input order" made the fit depend on the order of the
    # pairs. Only pairs whose item has several pairs need their id's rank (a sort of those ids alone).
    # (Pairs given in pair_id order, as curate gives them, need no sort: the rank is the row.)
    if labels["pair_id"].is_sorted():
        id_rank = np.arange(n_pairs, dtype=np.int64)
    else:
        repeated = np.flatnonzero(np.bincount(pair_item, minlength=n_items)[pair_item] > 1)  # (P',) pair rows
        id_rank = np.zeros(n_pairs, np.int64)
        id_rank[repeated] = labels["pair_id"][repeated].rank("ordinal").to_numpy().astype(np.int64)
    vote_key = pair_item[vote_row] * max(len(scorers), 1) + scorer_code  # (V,)
    by_key = _argsort_by(vote_key, id_rank[vote_row])
    first = by_key[np.r_[True, vote_key[by_key[1:]] != vote_key[by_key[:-1]]]] if by_key.size else by_key
    s_row, s_code, s_vote0 = vote_row[first], scorer_code[first], vote_0[first]  # ordered by (item, scorer)

    # Decisive human labels ordered by (item, orientation, choice, user): the float sums over them (the
    # EM's statistics, each item's evidence) then do not depend on the order of the pairs.
    human_rows = np.flatnonzero(is_decisive)
    user_of_row = _dense_codes(labels.select("user_id"))  # (P,) order-free codes, like pair_item
    human_rows = human_rows[_argsort_by(4 * pair_item[human_rows] + 2 * pair_flip[human_rows]
                                        + (label_0[human_rows] == 1.0), user_of_row[human_rows])]
    user_code = np.unique(user_of_row[human_rows], return_inverse=True)[1].astype(np.int64)  # annotators with a decisive label
    n_users = int(user_code.max()) + 1 if user_code.size else 0
    worker = np.concatenate([user_code, n_users + s_code]).astype(np.int64)
    item = np.concatenate([pair_item[human_rows], pair_item[s_row]]).astype(np.int64)
    flipped = np.concatenate([pair_flip[human_rows], pair_flip[s_row]])
    chose_0 = np.concatenate([label_0[human_rows] == 1.0, s_vote0])
    n_workers = n_users + len(scorers)  # annotators first, then the scorers
    n_human = human_rows.size
    if worker.size:
        sens, spec, _ = dawid_skene_pairs(
            worker, item, flipped, chose_0, np.full(n_items, config.prior_first), n_workers=n_workers,
            accuracy_prior_strength=config.accuracy_prior_strength, max_iter=config.max_iter, tol=config.tol)
    else:
        sens = spec = np.zeros(0)

    # Evidence toward each item's first image: orient = +1 when a row's image_0 is its item's first.
    orient = np.where(flipped, -1.0, 1.0)
    llr = log_likelihood_ratio(sens[worker], spec[worker], chose_0) if worker.size else np.zeros(0)  # (R,)
    prior = np.log(config.prior_first) - np.log1p(-config.prior_first)
    n_scored = np.bincount(item[n_human:], minlength=n_items)
    scorer_first = prior + np.bincount(item[n_human:], (llr * orient)[n_human:], minlength=n_items)  # (I,)
    human_first = np.bincount(item[:n_human], (llr * orient)[:n_human], minlength=n_items)  # (I,)

    clip = config.max_abs_log_odds
    pair_orient = np.where(pair_flip, -1.0, 1.0)
    scorer_0 = np.clip(scorer_first[pair_item] * pair_orient, -clip, clip)  # (P,) toward the pair's image_0
    has_scorer = n_scored[pair_item] > 0
    own_0 = np.zeros(n_pairs)  # the pair's own label's evidence toward its image_0
    own_0[human_rows] = llr[:n_human]
    peer_0 = (human_first[pair_item] * pair_orient - own_0) if config.use_peers else np.zeros(n_pairs)
    total_0 = np.clip(np.where(has_scorer, scorer_0, prior) + peer_0 + own_0, -clip, clip)
    toward_label = np.where(label_0 == 1.0, total_0, -total_0)
    per_pair = pl.DataFrame({
        "pair_id": labels["pair_id"],
        "scorer_log_odds": pl.Series(np.where(has_scorer, scorer_0, np.nan)).fill_nan(None),
        "calibrated_label": pl.Series(np.where(has_scorer & (scorer_0 != 0), (scorer_0 > 0).astype(float), np.nan))
        .fill_nan(None),
        "peer_log_odds": peer_0,
        "label_log_odds": pl.Series(np.where(is_decisive, np.where(label_0 == 1.0, own_0, -own_0), np.nan))
        .fill_nan(None),
        "label_posterior": pl.Series(np.where(is_decisive, 1.0 / (1.0 + np.exp(-toward_label)), np.nan))
        .fill_nan(None),
    }).cast(LABEL_RELIABILITY_SCHEMA)

    # Per scorer: its confusion, and how often its votes (all of them) agree with decisive human labels.
    k = n_users + np.arange(len(scorers))
    a, b = (sens[k], spec[k]) if k.size else (np.zeros(0), np.zeros(0))
    judged = is_decisive[vote_row]
    agree = np.bincount(scorer_code[judged], vote_0[judged] == (label_0[vote_row[judged]] == 1.0),
                        minlength=len(scorers))
    n_judged = np.bincount(scorer_code[judged], minlength=len(scorers))
    per_scorer = pl.DataFrame({
        "scorer": pl.Series(scorers, dtype=pl.String),
        "n_votes": np.bincount(s_code, minlength=len(scorers)).astype(np.int64),
        "sensitivity": a, "specificity": b, "reliability": (a + b) / 2,
        "log_odds_for_0": log_likelihood_ratio(a, b, np.ones(a.size, bool)),
        "log_odds_for_1": -log_likelihood_ratio(a, b, np.zeros(a.size, bool)),
        "agreement_with_humans": pl.Series(np.divide(agree, n_judged, out=np.full(len(scorers), np.nan),
                                                     where=n_judged > 0)).fill_nan(None),
    }).cast(SCORER_RELIABILITY_SCHEMA)
    return per_pair, per_scorer


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


def winner_truth_share(rows: pl.DataFrame, truth: pl.DataFrame) -> dict:
    """How much of a snapshot's training signal points at the truly better image.

    Args:
        rows: snapshot rows with pair_id, winner_image_id, weight and optionally label_smoothing
            (epsilon: the target puts 1 - epsilon on the winner and epsilon on the loser).
        truth: pair_id, better_image_id (the truly better image; pairs without a truth are skipped).

    Returns a dict: n_pairs (rows with a truth), weighted_share = sum w * 1[winner is better] / sum w,
    soft_share = the same with the target mass, sum w ((1 - eps) correct + eps (1 - correct)) / sum w,
    unweighted_share, mean_weight_correct and mean_weight_wrong (NaN when there are none).
    """
    frame = rows.join(truth.select("pair_id", "better_image_id"), on="pair_id", how="inner").filter(
        pl.col("better_image_id").is_not_null())
    if frame.height == 0:
        return {"n_pairs": 0, "weighted_share": float("nan"), "soft_share": float("nan"),
                "unweighted_share": float("nan"), "mean_weight_correct": float("nan"),
                "mean_weight_wrong": float("nan")}
    correct = (frame["winner_image_id"] == frame["better_image_id"]).to_numpy().astype(float)
    w = frame["weight"].to_numpy().astype(float)
    eps = frame["label_smoothing"].to_numpy().astype(float) if "label_smoothing" in frame.columns else 0.0 * w
    nan = float("nan")
    return {
        "n_pairs": frame.height,
        "weighted_share": float((w * correct).sum() / w.sum()) if w.sum() > 0 else nan,
        "soft_share": float((w * ((1 - eps) * correct + eps * (1 - correct))).sum() / w.sum()) if w.sum() > 0 else nan,
        "unweighted_share": float(correct.mean()),
        "mean_weight_correct": float(w[correct == 1].mean()) if (correct == 1).any() else nan,
        "mean_weight_wrong": float(w[correct == 0].mean()) if (correct == 0).any() else nan,
    }
