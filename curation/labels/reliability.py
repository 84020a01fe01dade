"""Label reliability: the posterior probability that a pair's human label is right.

The label model learns the scorers' evidence against the crowd instead of counting each scorer as
one vote ("learning from crowds", Raykar et al. 2010, JMLR 11:1297-1322). Items are unordered image
pairs (several people labelling the same two images inform each other); x_i holds each scorer's
normalised margin toward the item's first image (`prefcurate.curation.labels.votes`). Three steps, all over arrays:

1. Tastes (`taste_mixture`). Each annotator labels by one of one or two Bradley-Terry tastes
   sigmoid(c_j + w_k . x) (c_j its position intercept) or by none (spammers, position clickers); the
   majority taste is the one with more labels, and rho_j = P(annotator j labels by it). A consistent
   minority group below half of the labels forms its own component instead of bending the
   majority's w (a pooled fit leans toward a minority whose taste the scorers measure more precisely:
   in the small world's minority40 the pooled fit weighted exposure 3.7 and prompt colour 1.1, the
   minority's taste, and ranked minority annotators above reliable ones, AUROC 0.08).
2. Truth and confusion (`fit_crowd_model`): EM of P(first image better) = sigmoid(w . x_i), from the
   majority taste's w, jointly with each annotator's two-coin confusion, a_j = P(says image_0 | image_0 better) and
   b_j = P(says image_1 | image_1 better) (a position-biased clicker has a_j >> b_j). An annotator
   labels by another taste with probability 1 - rho_j, so its evidence uses the effective confusion
   a'_j = rho a_j + (1 - rho) q_j, b'_j = rho b_j + (1 - rho)(1 - q_j) (q_j its rate of image_0).
3. Reliability per annotator: the balanced accuracy (a + b) / 2 against the posterior truth with
   the annotator's own labels left out, shrunk to 1/2 by rho: 1/2 + (acc - 1/2) rho.

A label "image_0" by annotator j is evidence log a'_j/(1 - b'_j) toward image_0; a label "image_1"
is log (1 - a'_j)/b'_j (negative: toward image_1). With the pair's other evidence E (the scorers'
calibrated log-odds S plus the other humans' labels on the same images, all toward image_0), Bayes'
rule in log-odds space gives for the human label y of annotator j:

    lambda_j(y) = log a'_j - log(1 - b'_j)     if y = image_0
                = log(1 - a'_j) - log b'_j     if y = image_1
    P(image_0 better | everything) = sigmoid(E + lambda_j(y))
    posterior (label right) = sigmoid(+(E + lambda_j(y)))   if y = image_0
                            = sigmoid(-(E + lambda_j(y)))   if y = image_1

Checks (tests/test_curate_snapshot.py): a perfect annotator (a = b = 1) gives posterior 1; a
coin-flip annotator (a = 1 - b, e.g. a spammer 1/2, 1/2 or an always-left clicker 1, 0) gives
lambda = 0, the scorer posterior; a left-biased annotator's "left" is weaker evidence than its
"right".

Calibrated consensus. S = w . x, the fitted logistic's log-odds: BalancedDPO's scorer vote
(Tamboli et al., arXiv 2503.12575) with each scorer weighted by a weight learned against the crowd
instead of one vote each; calibrated_label = 1[S > 0]. The equal-vote form stays the `consensus`
table's (`prefcurate.curation.labels.consensus`, the paper baseline). Without scorers (e.g. WMT judges) the model is
plain two-coin Dawid-Skene (Dawid & Skene 1979, Applied Statistics 28(1)) over the peers' labels.

Minority taste. A consistent minority group gets rho ~ 0: its labels carry no evidence about the
majority's preference (lambda ~ 0), so its pairs' posteriors are the scorers' and peers' verdict
on the image it chose, low exactly where the tastes differ. The `reliability` snapshot therefore
down-weights such labels as noise for a majority-taste model; `SnapshotPolicy.annotator_group`
keeps a group's own labels as a separate snapshot instead (curation/snapshot.py).

Measured (small world v2, `benchmarks/minority.py --curate-only`, annotators with >= 20 labels):
detection AUROC (non-reliable vs reliable) 1.0 in crowd20, crowd40, minority20 and minority40 (each
kind 1.0; the equal-vote-prior Dawid-Skene, `annotator_stats` without a label model, has 0.91,
0.77 (minority taste 0.59), 0.75 and 0.22 on the same lakes). Weighted share of truly better
winners, reliability / adaptive / filter (min_reliability 0.55): clean00 0.928 / 0.894 / 0.898,
crowd20 0.921 / 0.853 / 0.883, crowd40 0.915 / 0.826 / 0.886, minority20 0.927 / 0.880 / 0.891,
minority40 0.923 / 0.871 / 0.892, flips20 0.912 / 0.799 / 0.842, flips40 0.712 / 0.684 / 0.767 (plain
labels 0.533; filter keeps 218 of 1,226 labels there, reliability 639): at 40 % random flips every
annotator is about 57 % right, which per-annotator statistics cannot see, and the model cannot tell
from 1,226 labels how far to trust the scorers. WMT13 judges (no scorers: plain Dawid-Skene, left
out own labels; benchmarks/wmt_reliability.py): Spearman with expert accuracy 0.33 (turkers 0.39),
against 0.36 (0.44) with the in-sample accuracy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from prefcurate.curation.labels.reliability_em import CrowdFit, _sigmoid, fit_crowd_model
from prefcurate.curation.labels.reliability_taste import capped_rows, taste_mixture
from prefcurate.curation.labels.reliability_votes import _argsort_by, _dense_codes, _scorer_votes, _ScorerVotes
from prefcurate.curation.labels.votes import as_lazy


TASTE_LABELS = 200_000  # labels the taste mixture reads at most (`capped_rows`); see taste_mixture
ANONYMOUS = "\x00anonymous"  # pseudo-annotator of labels without a user_id: one shared confusion

LABEL_RELIABILITY_SCHEMA = {
    "pair_id": pl.String, "scorer_log_odds": pl.Float64, "calibrated_label": pl.Float64,
    "peer_log_odds": pl.Float64, "label_log_odds": pl.Float64, "label_posterior": pl.Float64,
}
SCORER_RELIABILITY_SCHEMA = {
    "scorer": pl.String, "n_votes": pl.Int64, "sensitivity": pl.Float64, "specificity": pl.Float64,
    "reliability": pl.Float64, "log_odds_for_0": pl.Float64, "log_odds_for_1": pl.Float64,
    "agreement_with_humans": pl.Float64, "weight": pl.Float64,
}
LABEL_MODEL_ANNOTATORS_SCHEMA = {
    "user_id": pl.String, "n_decisive": pl.Int64, "sensitivity": pl.Float64, "specificity": pl.Float64,
    "loo_sensitivity": pl.Float64, "loo_specificity": pl.Float64, "majority_taste": pl.Float64,
    "reliability": pl.Float64,
}


@dataclass(frozen=True)
class LabelModelConfig:
    prior_first: float = 0.5
    """Prior P(an item's first image is better) without scorer evidence. Items order their images by
    id, which carries no information about quality, so the prior is flat."""
    accuracy_prior_strength: float = 4.0
    """Pseudo-labels shrinking each annotator's a, b toward the pooled values (as the annotators
    table): an annotator with 3 labels cannot get a = 1."""
    ridge: float = 1.0
    """Gaussian prior N(0, 1 / ridge) on each scorer weight (per unit of normalised margin). Against
    thousands of items it is negligible; it keeps w finite when a scorer separates the labels."""
    newton_steps: int = 2
    """Newton steps on w per M-step: w starts from the previous M-step's, so a few steps track the
    optimum (the EM converges all the same, as a generalised EM)."""
    max_abs_margin: float = 5.0
    """Clip of each normalised margin (units: a typical margin of that scorer) before the logistic: a
    linear log-odds would otherwise let one outlier pair's margin decide it outright."""
    taste_model: Literal["mixture", "pooled"] = "mixture"
    """"mixture": the majority's taste and each annotator's share of it from `taste_mixture`; the EM
    starts from that taste and a minority group's labels carry no evidence. "pooled": Raykar's model
    as published, every annotator on one taste and w from 0; it leans toward a minority whose taste the
    scorers measure more precisely (small world minority40: detection AUROC 0.08, module docstring)."""
    use_peers: bool = True
    """Other annotators' labels on the same two images count as evidence (Pick-a-Pic repeats pairs)."""
    max_abs_log_odds: float = 12.0
    """Clip of every log-odds (sigmoid(12) = 1 - 6e-6): a sum over several near-perfect voters would
    otherwise make posteriors of exactly 0 or 1."""
    max_iter: int = 30
    tol: float = 1e-4
    """Stop when no a, b or w moves more than this in one iteration."""

    def __post_init__(self) -> None:
        if not 0 < self.prior_first < 1 or self.accuracy_prior_strength < 0 or self.max_abs_log_odds <= 0 \
                or self.ridge <= 0 or self.newton_steps < 1 or self.max_abs_margin <= 0:
            raise ValueError(f"need 0 < prior_first < 1, accuracy_prior_strength >= 0, ridge > 0, newton_steps >= 1, "
                             f"max_abs_margin > 0 and max_abs_log_odds > 0; got {self}")
        if self.taste_model not in ("mixture", "pooled"):
            raise ValueError(f"taste_model={self.taste_model!r}; expected 'mixture' or 'pooled'")


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
    """(per-pair frame, per-scorer frame) of `label_model`."""
    per_pair, per_scorer, _ = label_model(pairs, votes, config)
    return per_pair, per_scorer


def label_model(
    pairs: pl.DataFrame | pl.LazyFrame,
    votes: pl.DataFrame | pl.LazyFrame,
    config: LabelModelConfig = LabelModelConfig(),
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Fit the joint crowd model (`fit_crowd_model`); return (per pair, per scorer, per annotator).

    Args:
        pairs: columns pair_id, user_id, label_0, image_0_id, image_1_id (lake pairs, ids resolved).
        votes: output of `prefcurate.curation.labels.votes.compute_votes` (pair_id, scorer, vote and, when present,
            normalized_margin: the scorer's feature; without it the vote's sign, +-1).

    Returns:
        per pair, in the order of `pairs` (LABEL_RELIABILITY_SCHEMA; integer pair ids, curate's row
        numbers, stay integers): scorer_log_odds (the fitted logistic's log-odds w . x toward image_0,
        null without a decisive scorer vote),
        calibrated_label (1 / 0 / null), peer_log_odds (the other humans' evidence on the same
        images, 0 when none or use_peers is off), label_log_odds (the label's own lambda toward its
        chosen image) and label_posterior (P(label right); null for ties and missing labels);
        per scorer, sorted by name (SCORER_RELIABILITY_SCHEMA): n_votes (decisive, one per item),
        weight (w_m, nats per typical margin), sensitivity / specificity of its votes against the
        posterior truth, reliability (a + b) / 2, log_odds_for_0 / _for_1 (the mean evidence w_m x
        its votes for image_0 / for image_1 carry, each toward the image voted for) and
        agreement_with_humans (share of decisive human labels it agrees with);
        per annotator with a decisive label, sorted by user_id (LABEL_MODEL_ANNOTATORS_SCHEMA;
        labels without a user_id are one pseudo-annotator, ANONYMOUS): the fitted a, b, the
        leave-one-out loo_sensitivity / loo_specificity and reliability = their mean (balanced
        accuracy against the posterior truth without the annotator's own labels).
    """
    pair_rows = _pair_rows(as_lazy(pairs, "pairs", ["pair_id", "user_id", "label_0", "image_0_id", "image_1_id"]))
    gathered = _scorer_votes(as_lazy(votes, "votes", ["pair_id", "scorer", "vote"]), pair_rows.pair_id,
                             pair_rows.item, pair_rows.flip, pair_rows.id_rank, pair_rows.label_0,
                             config.max_abs_margin)
    humans = _human_labels(pair_rows)
    pair_rows.user_id = pair_rows.user_id.clear()  # the labels' user strings are not needed any more
    worker, item, flipped, chose_0 = humans.worker, humans.item, humans.flipped, humans.chose_0
    n_users = humans.user_names.len()
    prior = float(np.log(config.prior_first) - np.log1p(-config.prior_first))
    direction, shares = None, np.ones(n_users)
    if config.taste_model == "mixture" and len(gathered.scorers) and worker.size:
        rows = capped_rows(worker, n_users, TASTE_LABELS)  # the margins of only the labels the mixture reads
        margins = gathered.features[item[rows]] * np.where(flipped[rows], -1.0, 1.0)[:, None]  # (R', M)
        direction, shares, _ = taste_mixture(worker[rows], chose_0[rows], margins, n_workers=n_users,
                                             ridge=config.ridge, max_labels=TASTE_LABELS)
        del rows, margins
    fit = fit_crowd_model(worker, item, flipped, chose_0, gathered.features,
                          n_workers=n_users, ridge=config.ridge,
                          newton_steps=config.newton_steps, accuracy_prior_strength=config.accuracy_prior_strength,
                          prior_log_odds=prior, taste_share=shares, max_iter=config.max_iter, tol=config.tol,
                          initial_weight=direction)
    per_annotator = pl.DataFrame({
        "user_id": humans.user_names, "n_decisive": np.bincount(worker, minlength=n_users).astype(np.int64),
        "sensitivity": fit.effective_sensitivity, "specificity": fit.effective_specificity,
        "loo_sensitivity": fit.loo_sensitivity, "loo_specificity": fit.loo_specificity,
        "majority_taste": shares,
        # expected balanced accuracy for the majority's taste: with probability 1 - rho the annotator labels
        # by a taste of its own, taken as uninformative (1/2) about the majority's
        "reliability": 0.5 + ((fit.loo_sensitivity + fit.loo_specificity) / 2 - 0.5) * shares,
    }).cast(LABEL_MODEL_ANNOTATORS_SCHEMA)
    return _per_pair(pair_rows, humans, gathered, fit, config), _per_scorer(gathered, fit), per_annotator


@dataclass
class _PairRows:
    """The pairs as the label model reads them (P pairs, I items = unordered image pairs)."""
    pair_id: pl.Series  # (P,) integer (curate's row numbers) or string ids
    user_id: pl.Series  # (P,) String, ANONYMOUS for labels without a user
    label_0: np.ndarray  # (P,) float 1 / 0 / 0.5 / NaN
    item: np.ndarray  # (P,) int64 item of each pair
    flip: np.ndarray  # (P,) bool: the pair's image_0 is its item's second image
    id_rank: np.ndarray | None  # (P,) rank of the pair's id among its item's pairs; None: the row (ids sorted)
    n_items: int

    @property
    def is_decisive(self) -> np.ndarray:
        return (self.label_0 == 0.0) | (self.label_0 == 1.0)


def _pair_rows(pair_lazy: pl.LazyFrame) -> _PairRows:
    """Read the pairs (pair_id, user_id, label_0, image_0_id, image_1_id) into `_PairRows`."""
    integer_ids = pair_lazy.collect_schema()["pair_id"].is_integer()  # curate's row numbers: no strings
    labels = pair_lazy.select(
        pl.col("pair_id") if integer_ids else pl.col("pair_id").cast(pl.String),
        pl.col("user_id").cast(pl.String).fill_null(ANONYMOUS),
        pl.col("label_0").cast(pl.Float64),
        _flip=pl.col("image_0_id") > pl.col("image_1_id"),
        _lo=pl.min_horizontal("image_0_id", "image_1_id"), _hi=pl.max_horizontal("image_0_id", "image_1_id"),
    ).collect()
    n_pairs = labels.height
    pair_item = _dense_codes(labels.select("_lo", "_hi"))  # (P,) unordered image pair of each pair row
    n_items = int(pair_item.max()) + 1 if n_pairs else 0
    # Rank of each pair's id, for the one vote per (item, scorer): pairs given in pair_id order (as curate
    # gives them) need no sort, the rank is the row; otherwise only pairs whose item has several pairs
    # need their id's rank (a sort of those ids alone).
    id_rank = None  # the row
    if not labels["pair_id"].is_sorted():
        repeated = np.flatnonzero(np.bincount(pair_item, minlength=n_items)[pair_item] > 1)  # (P',) pair rows
        id_rank = np.zeros(n_pairs, np.int64)
        id_rank[repeated] = labels["pair_id"][repeated].rank("ordinal").to_numpy().astype(np.int64)
    return _PairRows(labels["pair_id"], labels["user_id"], labels["label_0"].to_numpy(), pair_item,
                     labels["_flip"].to_numpy().astype(bool), id_rank, n_items)


@dataclass(frozen=True)
class _HumanLabels:
    """The decisive human labels (R) in the label model's fixed order, and their annotators (W)."""
    rows: np.ndarray  # (R,) pair row of each label
    worker: np.ndarray  # (R,) index into user_names
    user_names: pl.Series  # (W,) sorted
    item: np.ndarray  # (R,)
    flipped: np.ndarray  # (R,) bool
    chose_0: np.ndarray  # (R,) bool


def _human_labels(pairs: _PairRows) -> _HumanLabels:
    """Decisive human labels ordered by (item, orientation, choice, user): the float sums over them (the
    EM's statistics, each item's evidence) then do not depend on the order of the pairs."""
    label_0, n_pairs = pairs.label_0, pairs.label_0.size
    human_rows = np.flatnonzero(pairs.is_decisive)
    user_of_row = _dense_codes(pairs.user_id.to_frame())  # (P,) order-free codes, like the items
    human_rows = human_rows[_argsort_by(4 * pairs.item[human_rows] + 2 * pairs.flip[human_rows]
                                        + (label_0[human_rows] == 1.0), user_of_row[human_rows])]
    # annotators with a decisive label, by sorted user_id: names from each code's first row (no string per label)
    n_codes = int(user_of_row.max()) + 1 if n_pairs else 0
    present = np.flatnonzero(np.bincount(user_of_row[human_rows], minlength=n_codes))  # (W,) codes, ascending
    code_index = np.zeros(n_codes, np.int64)
    code_index[present] = np.arange(present.size)
    code_of_row = code_index[user_of_row[human_rows]]  # (R,) index into present (np.unique's inverse, no sort)
    first_row = np.full(n_codes, -1, np.int64)
    first_row[user_of_row[::-1]] = np.arange(n_pairs - 1, -1, -1)
    names = pairs.user_id.gather(first_row[present])  # (W,) in code order
    by_name = np.argsort(names.to_numpy(), kind="stable") if names.len() else np.zeros(0, np.int64)
    position = np.empty(by_name.size, np.int64)
    position[by_name] = np.arange(by_name.size)
    return _HumanLabels(human_rows, position[code_of_row], names.gather(by_name), pairs.item[human_rows],
                        pairs.flip[human_rows], label_0[human_rows] == 1.0)


def _per_pair(pairs: _PairRows, humans: _HumanLabels, gathered: _ScorerVotes, fit: CrowdFit,
              config: LabelModelConfig) -> pl.DataFrame:
    """The per-pair frame of `label_model` (LABEL_RELIABILITY_SCHEMA), in the order of the pairs.

    Evidence toward each item's first image (orient = +1 when a row's image_0 is its item's first). Each
    label's evidence uses its annotator's confusion measured without the annotator's own labels
    (cross-fitting): with the in-sample a, b a heavy annotator's labels confirm themselves wherever the
    scorers are weak (small world flips40: a = 0.79, b = 0.84 in sample, 0.54 left out)."""
    n_pairs, label_0, is_decisive = pairs.label_0.size, pairs.label_0, pairs.is_decisive
    llr = log_likelihood_ratio(fit.effective_loo_sensitivity[humans.worker],
                               fit.effective_loo_specificity[humans.worker], humans.chose_0)  # (R,) toward image_0
    human_first = np.bincount(humans.item, llr * np.where(humans.flipped, -1.0, 1.0), minlength=pairs.n_items)  # (I,)
    has_scorer = gathered.voted.any(axis=1)[pairs.item] if gathered.scorers else np.zeros(n_pairs, bool)  # (P,)
    clip = config.max_abs_log_odds
    pair_orient = np.where(pairs.flip, -1.0, 1.0)
    scorer_0 = np.clip(fit.prior_log_odds[pairs.item] * pair_orient, -clip, clip)  # (P,) toward the pair's image_0
    own_0 = np.zeros(n_pairs)  # the pair's own label's evidence toward its image_0
    own_0[humans.rows] = llr
    peer_0 = (human_first[pairs.item] * pair_orient - own_0) if config.use_peers else np.zeros(n_pairs)
    total_0 = np.clip(scorer_0 + peer_0 + own_0, -clip, clip)
    toward_label = np.where(label_0 == 1.0, total_0, -total_0)
    return pl.DataFrame({
        "pair_id": pairs.pair_id,
        "scorer_log_odds": pl.Series(np.where(has_scorer, scorer_0, np.nan)).fill_nan(None),
        "calibrated_label": pl.Series(np.where(has_scorer & (scorer_0 != 0), (scorer_0 > 0).astype(float), np.nan))
        .fill_nan(None),
        "peer_log_odds": peer_0,
        "label_log_odds": pl.Series(np.where(is_decisive, np.where(label_0 == 1.0, own_0, -own_0), np.nan))
        .fill_nan(None),
        "label_posterior": pl.Series(np.where(is_decisive, 1.0 / (1.0 + np.exp(-toward_label)), np.nan))
        .fill_nan(None),
    }).cast({name: dtype for name, dtype in LABEL_RELIABILITY_SCHEMA.items()  # integer ids: no string each
             if name != "pair_id" or not pairs.pair_id.dtype.is_integer()})


def _per_scorer(gathered: _ScorerVotes, fit: CrowdFit) -> pl.DataFrame:
    """The per-scorer frame of `label_model` (SCORER_RELIABILITY_SCHEMA): its weight; its (one per item) votes'
    confusion against the posterior truth mu and the mean evidence they carry; how often its votes (all of
    them) agree with decisive human labels."""
    n_scorers = len(gathered.scorers)
    mu = _sigmoid(fit.log_odds)  # (I,) P(the item's first image is better)
    n_votes, sens_m, spec_m = np.zeros(n_scorers), np.full(n_scorers, np.nan), np.full(n_scorers, np.nan)
    for_0, for_1 = np.full(n_scorers, np.nan), np.full(n_scorers, np.nan)
    for m in range(n_scorers):  # one column at a time: (I,) temporaries
        voted = gathered.voted[:, m]
        flip = gathered.chosen_flip[:, m][voted]
        mu_0 = np.where(flip, 1.0 - mu[voted], mu[voted])  # P(the voted pair's image_0 is better)
        toward_0 = gathered.features[:, m][voted].astype(np.float64) * np.where(flip, -1.0, 1.0)  # pair's image_0
        vote_0 = toward_0 > 0
        n_votes[m], n_0 = voted.sum(), vote_0.sum()
        q_sum, q_agree = mu_0.sum(), mu_0[vote_0].sum()
        sens_m[m] = q_agree / q_sum if q_sum > 0 else np.nan
        not_q = n_votes[m] - q_sum
        spec_m[m] = ((n_votes[m] - n_0) - (q_sum - q_agree)) / not_q if not_q > 0 else np.nan
        evidence_0 = fit.weight[m] * toward_0  # the vote's evidence toward the pair's image_0
        for_0[m] = evidence_0[vote_0].mean() if n_0 else np.nan
        for_1[m] = -evidence_0[~vote_0].mean() if n_votes[m] > n_0 else np.nan
    agreement = np.divide(gathered.agree, gathered.judged, out=np.full(n_scorers, np.nan), where=gathered.judged > 0)
    return pl.DataFrame({
        "scorer": pl.Series(gathered.scorers, dtype=pl.String), "n_votes": n_votes.astype(np.int64),
        "sensitivity": sens_m, "specificity": spec_m, "reliability": (sens_m + spec_m) / 2,
        "log_odds_for_0": for_0, "log_odds_for_1": for_1, "agreement_with_humans": agreement,
        "weight": fit.weight,
    }).with_columns(pl.exclude("scorer", "n_votes").fill_nan(None)).cast(SCORER_RELIABILITY_SCHEMA)


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
