"""Label reliability: the posterior probability that a pair's human label is right.

The label model learns the scorers' evidence against the crowd instead of counting each scorer as
one vote ("learning from crowds", Raykar et al. 2010, JMLR 11:1297-1322). Items are unordered image
pairs (several people labelling the same two images inform each other); x_i holds each scorer's
normalised margin toward the item's first image (`curation.votes`). Three steps, all over arrays:

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
table's (`curation.consensus`, the paper baseline). Without scorers (e.g. WMT judges) the model is
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

from curation.votes import as_lazy


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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# The label model's products have 5-odd columns and up to millions of rows. Through BLAS they would wake its
# thread pool for microseconds of work each (measured at 1M pairs: 7.2 s of CPU against 4.9 s with one BLAS
# thread, the rest spent by idle threads spinning), so they are written as column-wise numpy arithmetic: one
# thread, and a summation order that does not depend on the machine's BLAS or its thread count.

def _matvec(a: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(R,) a @ v for a (R, K) and v (K,), in a's dtype (K = 0: zeros)."""
    out = np.zeros(a.shape[0], a.dtype)
    for k in range(a.shape[1]):
        out += a[:, k] * v[k]
    return out


def _column_sums(a: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(K,) a.T @ weight for a (R, K) and weight (R,)."""
    return np.array([np.sum(a[:, k] * weight) for k in range(a.shape[1])], dtype=np.float64)


def _gram(a: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """(K, K) sum_r weight_r a_r a_r^T for a (R, K) and weight (R,)."""
    k = a.shape[1]
    out = np.zeros((k, k))
    for i in range(k):
        weighted = a[:, i] * weight
        for j in range(i, k):
            out[i, j] = out[j, i] = np.sum(weighted * a[:, j])
    return out


@dataclass(frozen=True)
class CrowdFit:
    """What `fit_crowd_model` returns (W annotators, M scorers, I items)."""
    sensitivity: np.ndarray  # (W,) a_j = P(picks image_0 | image_0 better)
    specificity: np.ndarray  # (W,) b_j = P(picks image_1 | image_1 better)
    weight: np.ndarray  # (M,) logistic weight per unit of normalised margin (nats)
    prior_log_odds: np.ndarray  # (I,) w . x_i: the scorers' log-odds that the item's first image is better
    log_odds: np.ndarray  # (I,) posterior log-odds: prior + every label's lambda, toward the first image
    loo_sensitivity: np.ndarray  # (W,) a_j against the posterior without the annotator's own labels
    loo_specificity: np.ndarray  # (W,) b_j likewise
    n_iter: int
    effective_sensitivity: np.ndarray  # (W,) a'_j, the confusion the evidence uses (see taste_share)
    effective_specificity: np.ndarray  # (W,) b'_j
    effective_loo_sensitivity: np.ndarray  # (W,) a'_j from the leave-one-out a_j
    effective_loo_specificity: np.ndarray  # (W,) b'_j likewise


def fit_crowd_model(
    worker: np.ndarray, item: np.ndarray, flipped: np.ndarray, chose_0: np.ndarray, features: np.ndarray, *,
    n_workers: int | None = None, ridge: float = 1.0, newton_steps: int = 2, accuracy_prior_strength: float = 4.0,
    prior_log_odds: float = 0.0, taste_share: np.ndarray | None = None, initial_weight: np.ndarray | None = None,
    max_iter: int = 100, tol: float = 1e-5, max_fit_items: int = 500_000,
) -> CrowdFit:
    """Learning from crowds (Raykar et al. 2010, JMLR 11:1297-1322, §2): a logistic model of the
    truth on item features, fitted jointly with each annotator's two-coin confusion by EM.

    Args (R decisive labels, I items = unordered image pairs, M features, W annotators):
        worker: (R,) int annotator index in [0, W); item: (R,) int item index in [0, I).
        flipped: (R,) bool, the label's image_0 is its item's second image.
        chose_0: (R,) bool, the label picked its own image_0.
        features: (I, M) float x_i, each scorer's normalised margin toward the item's first image (0
            where the scorer did not vote). M = 0: no scorers, plain two-coin Dawid-Skene.
        prior_log_odds: constant added to every item's prior log-odds (0 = a flat prior).
        taste_share: (W,) rho_j, the probability that annotator j labels by the majority's taste
            (`taste_mixture`); None = 1. With probability 1 - rho_j its labels follow a taste of
            its own, taken as independent of the majority's truth (it picks image_0 at its own rate
            q_j), so its evidence uses the effective confusion a'_j = rho a_j + (1 - rho) q_j,
            b'_j = rho b_j + (1 - rho)(1 - q_j): rho = 0 makes lambda = 0 (returned as effective_*).
        initial_weight: (M,) w to start from (default 0: the first E-step is the annotators' vote).
        max_fit_items: w's Newton steps use at most this many labelled items (evenly spaced over the
            item index): M weights are known to about 0.01 from half a million items, and each EM
            iteration then costs a few passes over the labels and items, not a regression over all.

    Model. P(item i's first image is better | x_i) = p_i = sigmoid(w . x_i) (Raykar eq. 1; no
    intercept: swapping the two images negates x_i, and must negate the log-odds). Annotator j picks
    image_0 with probability a_j when image_0 is better and image_1 with probability b_j when image_1
    is (Raykar §2.1's sensitivity alpha and specificity beta, read on the shown order so that a
    position bias shows as a_j >> b_j). EM (Raykar §2.3):
        E-step  mu_i = sigmoid(w . x_i + sum over the item's labels of lambda_j(y) * orient)
                (lambda_j as in the module docstring; orient = -1 for a flipped label), Raykar's
                mu_i = a_i p_i / (a_i p_i + b_i (1 - p_i)) in log-odds form;
        M-step  a_j = sum_r q_r [chose_0] / sum_r q_r, b_j = sum_r (1 - q_r) [not chose_0] / sum_r (1 - q_r)
                with q_r = P(label r's image_0 better) (Raykar's closed form, here shrunk toward the
                pooled a, b with `accuracy_prior_strength` pseudo-labels, a MAP estimate);
                w: `newton_steps` Newton-Raphson steps on the cross-entropy of sigmoid(X w) against
                mu over the labelled items, with a ridge (Raykar's Hessian H = -X^T diag(p(1-p)) X).
    The majority of the labels thus defines the truth: scorers are not voters but features whose
    weights are learned against the crowd, and an annotator whose taste departs from the majority's
    disagrees with mu where tastes differ (a_j + b_j falls below that of a reliable annotator).

    The leave-one-out confusion loo_* is the same M-step formula with q_r computed from the item's
    log-odds minus the annotator's own labels on it (w and the others' a, b are not refitted): on an
    item labelled once it is the agreement with the scorers' learned prior, which the annotator's
    own label cannot confirm.
    """
    worker = np.asarray(worker, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    flipped, chose_0 = np.asarray(flipped, dtype=bool), np.asarray(chose_0, dtype=bool)
    features = np.asarray(features, dtype=np.float32)  # (I, M): 20 bytes an item at M = 5
    if features.ndim != 2 or features.shape[0] < (int(item.max()) + 1 if item.size else 0):
        raise ValueError(f"features must be (I, M) with a row per item, got {features.shape}")
    n_items, n_features = features.shape
    if n_workers is None:
        n_workers = int(worker.max()) + 1 if worker.size else 0
    orient = np.where(flipped, -1.0, 1.0).astype(np.float32)  # (R,) label's image_0 log-odds -> item's first image
    label_type = (2 * worker + chose_0).astype(np.int32 if 2 * n_workers < 2**31 else np.int64)  # (R,) (W, 2) table
    labelled = np.flatnonzero(np.bincount(item, minlength=n_items) > 0)  # items the logistic is fitted on
    labelled = labelled[::-(-labelled.size // max_fit_items)] if labelled.size > max_fit_items else labelled
    x = features[labelled].astype(np.float64)  # (I', M)
    sens, spec = np.full(n_workers, 0.7), np.full(n_workers, 0.7)
    w = np.zeros(n_features) if initial_weight is None else np.asarray(initial_weight, dtype=np.float64).copy()
    eps, strength = 1e-4, accuracy_prior_strength
    rho = np.ones(n_workers) if taste_share is None else np.asarray(taste_share, dtype=float)
    left = (np.bincount(worker, chose_0, n_workers) + 1.0) / (np.bincount(worker, minlength=n_workers) + 2.0)  # q_j

    def effective(sens: np.ndarray, spec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return rho * sens + (1 - rho) * left, rho * spec + (1 - rho) * (1 - left)

    def lambdas(sens: np.ndarray, spec: np.ndarray) -> np.ndarray:  # (2W,): label image_1, label image_0
        sens, spec = effective(sens, spec)
        return np.stack([np.log1p(-sens) - np.log(spec), np.log(sens) - np.log1p(-spec)], axis=1).ravel()

    def confusion(q: np.ndarray, use: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        # q (R,) P(label's image_0 better); use (R,) bool, the labels counted (None: all); the shrunk M-step
        if use is not None:
            q = np.where(use, q, 0.0)
        n_labels = np.bincount(worker, use, n_workers).astype(float)
        n_chose_0 = np.bincount(worker, chose_0 if use is None else chose_0 & use, n_workers)
        q_sum = np.bincount(worker, q, n_workers)
        q_agree = np.bincount(worker, np.where(chose_0, q, 0.0), n_workers)
        not_q_sum = n_labels - q_sum
        not_q_agree = (n_labels - n_chose_0) - (q_sum - q_agree)
        pooled_a = q_agree.sum() / max(q_sum.sum(), eps)
        pooled_b = not_q_agree.sum() / max(not_q_sum.sum(), eps)
        return (((q_agree + strength * pooled_a) / (q_sum + strength)).clip(eps, 1 - eps),
                ((not_q_agree + strength * pooled_b) / (not_q_sum + strength)).clip(eps, 1 - eps))

    def prior_of(w: np.ndarray) -> np.ndarray:  # (I,) float64
        return prior_log_odds + _matvec(features, w.astype(np.float32)).astype(np.float64)

    prior = prior_of(w)
    evidence = np.bincount(item, lambdas(sens, spec)[label_type] * orient, n_items)  # (I,)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        mu = _sigmoid(prior + evidence)  # E-step, (I,)
        new_sens, new_spec = confusion(_sigmoid((prior + evidence)[item] * orient))
        new_w = w.copy()
        if n_features:
            target = mu[labelled]
            for _ in range(newton_steps):
                p = _sigmoid(prior_log_odds + _matvec(x, new_w))
                gradient = _column_sums(x, target - p) - ridge * new_w
                hessian = _gram(x, p * (1 - p)) + ridge * np.eye(n_features)
                new_w = new_w + np.linalg.solve(hessian, gradient)
        change = max(np.abs(new_sens - sens).max(initial=0.0), np.abs(new_spec - spec).max(initial=0.0),
                     np.abs(new_w - w).max(initial=0.0))
        sens, spec, w = new_sens, new_spec, new_w
        prior = prior_of(w)
        evidence = np.bincount(item, lambdas(sens, spec)[label_type] * orient, n_items)
        if change < tol:
            break
    log_odds = prior + evidence
    # Leave-one-out: subtract the annotator's own labels on the item (all of them: an annotator may label
    # the same two images twice). Only items with several labels need the (item, annotator) sums.
    del evidence
    row_evidence = lambdas(sens, spec)[label_type] * orient  # (R,) toward the item's first image
    loo = log_odds[item] - row_evidence  # (R,) toward the item's first image, the label's own left out
    shared = np.flatnonzero(np.bincount(item, minlength=n_items)[item] > 1)
    if shared.size:  # an annotator's other labels on the same item are its own too
        _, key = np.unique(item[shared] * max(n_workers, 1) + worker[shared], return_inverse=True)
        loo[shared] = log_odds[item[shared]] - np.bincount(key, row_evidence[shared])[key]
        del key
    del shared, row_evidence
    loo *= orient  # toward the label's image_0
    # Labels with no evidence at all once their own are left out (flat prior, no scorer, no peer) say
    # nothing about their annotator: they are left out rather than counted as coin flips.
    loo_sens, loo_spec = confusion(_sigmoid(loo), loo != 0)
    return CrowdFit(sens, spec, w, prior, log_odds, loo_sens, loo_spec, n_iter, *effective(sens, spec),
                    *effective(loo_sens, loo_spec))


@dataclass(frozen=True)
class Tastes:
    """Each annotator's own taste (`annotator_tastes`; W annotators, M scorers)."""
    taste: np.ndarray  # (W, M) t_j
    intercept: np.ndarray  # (W,) c_j, the position intercept
    precision: np.ndarray  # (W, M, M) -d^2 log L / dt^2 at t_j with c_j profiled out (plus the ridge)
    log_likelihood: np.ndarray  # (W,) log L_j(t_j, c_j) of the annotator's labels


def _weighted_gram(a: np.ndarray, weight: np.ndarray, worker: np.ndarray, n_workers: int) -> np.ndarray:
    """(W, K, K) per annotator sum_r weight_r a_r a_r^T for a (R, K): one bincount per entry of the upper
    triangle, so that no (R, K, K) array is made."""
    k = a.shape[1]
    out = np.zeros((n_workers, k, k))
    for i in range(k):
        for j in range(i, k):
            out[:, i, j] = out[:, j, i] = np.bincount(worker, weight * a[:, i] * a[:, j], n_workers)
    return out


def annotator_tastes(worker: np.ndarray, chose_0: np.ndarray, x: np.ndarray, *, n_workers: int,
                     ridge: float = 1.0, newton_steps: int = 6) -> Tastes:
    """Each annotator's own taste: a ridge logistic regression of its choices on the scorers' margins,
    P(annotator j picks image_0) = sigmoid(c_j + t_j . x_r) (the Bradley-Terry model with a linear
    reward, Bradley & Terry 1952, Biometrika 39(3/4), eq. 1, plus a position intercept c_j so that a
    left-clicker's bias does not enter its taste t_j).

    Args: worker (R,) in [0, W); chose_0 (R,) bool; x (R, M) margins toward the label's image_0.
    All annotators' Newton steps at once: per annotator the gradient and the (M + 1)^2 Hessian are
    sums over its labels (np.bincount), then one batched solve. Also returned: the curvature of the
    log-likelihood in t_j with c_j profiled out (the Schur complement H_tt - H_tc H_cc^-1 H_ct), so
    that log L_j(t) ~ log L_j(t_j) - (t - t_j)^T P_j (t - t_j) / 2 near t_j (Laplace's approximation).
    """
    m = x.shape[1]
    y = np.asarray(chose_0, dtype=np.float64)
    z = np.concatenate([np.ones((x.shape[0], 1), dtype=x.dtype), x], axis=1)  # (R, M + 1)
    theta = np.zeros((n_workers, m + 1))

    def logit_of(theta: np.ndarray) -> np.ndarray:  # (R,), one column at a time: no (R, M) temporary
        out = theta[worker, 0].copy()
        for k in range(m):
            out += z[:, k + 1] * theta[worker, k + 1]
        return out

    hessian = np.zeros((n_workers, m + 1, m + 1))
    for _ in range(newton_steps):
        p = _sigmoid(logit_of(theta))
        gradient = np.stack([np.bincount(worker, z[:, k] * (y - p), n_workers) for k in range(m + 1)], 1) - ridge * theta
        hessian = _weighted_gram(z, p * (1 - p), worker, n_workers) + ridge * np.eye(m + 1)
        theta = theta + np.linalg.solve(hessian, gradient[..., None])[..., 0]
    logit = logit_of(theta)
    log_likelihood = np.bincount(worker, -np.logaddexp(0.0, -np.where(chose_0, logit, -logit)), n_workers)
    h_cc, h_ct = hessian[:, 0, 0], hessian[:, 0, 1:]  # (W,), (W, M)
    precision = hessian[:, 1:, 1:] - h_ct[:, :, None] * h_ct[:, None, :] / h_cc[:, None, None]
    return Tastes(theta[:, 1:], theta[:, 0], precision, log_likelihood)


def weighted_median(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(M,) coordinate-wise weighted median of values (W, M) with weights (W,) >= 0: the smallest value
    whose cumulative weight reaches half the total. Its breakdown point is 1/2 (Huber 1981, Robust
    Statistics, §3.2): as long as more than half the weight lies in one group, the median lies
    within that group's range, whatever the rest does."""
    if values.shape[0] == 0:
        return np.zeros(values.shape[1])
    order = np.argsort(values, axis=0, kind="stable")  # (W, M)
    cumulative = np.cumsum(np.asarray(weights, dtype=float)[order], axis=0)
    at = np.argmax(cumulative >= cumulative[-1] / 2, axis=0)  # (M,)
    columns = np.arange(values.shape[1])
    return values[order[at, columns], columns]


def _label_log_likelihood(worker: np.ndarray, chose_0: np.ndarray, logit: np.ndarray, n_workers: int) -> np.ndarray:
    """(W,) sum over each annotator's labels of log P(its choice), P(image_0) = sigmoid(logit)."""
    return np.bincount(worker, -np.logaddexp(0.0, -np.where(chose_0, logit, -logit)), n_workers)


def capped_rows(worker: np.ndarray, n_workers: int, max_rows: int) -> np.ndarray:
    """Rows to keep so that at most max_rows remain: each annotator's first min(n_j, cap) rows (in row
    order), with the largest cap that fits (water-filling): light annotators keep every label, the
    heaviest give up their surplus. All rows when they fit."""
    if worker.size <= max_rows:
        return np.arange(worker.size)
    counts = np.sort(np.bincount(worker, minlength=n_workers))
    kept = np.cumsum(counts) + counts * np.arange(n_workers - 1, -1, -1)  # total kept with cap = counts[i]
    i = int(np.searchsorted(kept, max_rows, side="right"))  # caps below counts[i] fit
    below = int(counts[:i].sum())
    cap = counts[i - 1] if i else 0
    cap = max(int(cap), (max_rows - below) // max(n_workers - i, 1))
    order = np.argsort(worker, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(worker, minlength=n_workers))[:-1]]
    rank = np.empty(worker.size, np.int64)
    rank[order] = np.arange(worker.size) - starts[worker[order]]
    return np.flatnonzero(rank < cap)


def taste_mixture(worker: np.ndarray, chose_0: np.ndarray, x: np.ndarray, *, n_workers: int, ridge: float = 1.0,
                  n_iter: int = 50, tol: float = 1e-4, max_labels: int = 200_000) -> tuple[np.ndarray, np.ndarray, int]:
    """The majority's taste and, per annotator, the probability that it labels by it.

    A mixture over annotators (each annotator's labels all come from one component; a mixture of
    Bradley-Terry models, Bradley & Terry 1952, Biometrika 39(3/4), eq. 1, with a linear reward in the
    scorers' margins): P(annotator j picks image_0 | component k) = sigmoid(c_j + w_k . x), c_j its
    own position intercept, w_k a taste shared by the component. Components: one or two tastes plus
    a "no taste" one (w = 0: spammers and position clickers). Generalised EM: responsibilities r_jk
    proportional to pi_k prod_r P(y_r | k); then one Newton step for each w_k on the r-weighted ridge
    logistic regression and one for each c_j; pi_k = the label-weighted mean of r_jk; until no
    responsibility moves more than tol. The second taste is kept only if the AIC (Akaike 1974, IEEE
    Trans. Autom. Control 19(6)) prefers it: 2 (log L_2 - log L_1) > 2 (M + 1). (Measured on the
    small world, 1,226 labels: the conditions without a minority gave 2.1-5.0, those with one
    28.7-138.9; BIC's (M + 1) log R = 35.6 rejected crowd20's minority of 7 % of the labels.) The
    majority taste is the taste component with the larger pi (more labels); a group with fewer than
    half of the labels forms the other one instead of pulling the majority's w toward its taste.
    Start: the majority taste at the label-weighted coordinate-wise median of the annotators' own
    tastes (`annotator_tastes`), the second at the own taste of the annotator it fits worst.
    Beyond max_labels labels the fit uses each annotator's first labels up to a common cap
    (`capped_rows`): a logistic weight's standard error is about 1 / sqrt(n p (1 - p) var x), ~0.005
    at n = 200,000 labels (p (1 - p) ~ 0.2, unit margins).

    Args: worker (R,) in [0, W); chose_0 (R,) bool; x (R, M) margins toward the label's image_0.
    Returns (w (M,) of the majority taste, rho (W,) = r_j,majority, number of tastes 1 or 2).
    """
    rows = capped_rows(worker, n_workers, max_labels)
    if rows.size < worker.size:
        worker, chose_0, x = worker[rows], chose_0[rows], x[rows]
    m = x.shape[1]
    x = np.asfortranarray(x, dtype=np.float64)  # (R, M), columns contiguous for the products below
    y = np.asarray(chose_0, dtype=np.float64)
    n_labels = np.bincount(worker, minlength=n_workers).astype(float)
    tastes = annotator_tastes(worker, chose_0, x, n_workers=n_workers, ridge=ridge)
    start = weighted_median(tastes.taste, n_labels)

    def log_likelihoods(w: np.ndarray, c: np.ndarray) -> np.ndarray:  # (W, K)
        return np.stack([_label_log_likelihood(worker, chose_0, c[worker] + _matvec(x, wk), n_workers) for wk in w], 1)

    def fit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        w, c = w.copy(), tastes.intercept.copy()
        log_pi, previous = np.full(len(w), -np.log(len(w))), None
        for _ in range(n_iter):
            joint = log_likelihoods(w, c) + log_pi
            resp = np.exp(joint - joint.max(axis=1, keepdims=True))
            resp /= resp.sum(axis=1, keepdims=True)  # (W, K)
            log_pi = np.log(np.maximum((resp * n_labels[:, None]).sum(0) / max(n_labels.sum(), 1.0), 1e-12))
            gradient_c, hessian_c = -ridge * c, np.full(n_workers, ridge)
            for k in range(len(w)):
                weight = resp[worker, k]  # (R,)
                p = _sigmoid(c[worker] + _matvec(x, w[k]))
                gradient_c += np.bincount(worker, weight * (y - p), n_workers)
                hessian_c += np.bincount(worker, weight * p * (1 - p), n_workers)
                if k < len(w) - 1:  # the last component stays w = 0
                    hessian = _gram(x, weight * p * (1 - p))  # (M, M)
                    w[k] = w[k] + np.linalg.solve(hessian + ridge * np.eye(m), _column_sums(x, weight * (y - p)) - ridge * w[k])
            c = c + gradient_c / hessian_c
            if previous is not None and np.abs(resp - previous).max(initial=0.0) < tol:
                break
            previous = resp
        joint = log_likelihoods(w, c) + log_pi
        resp = np.exp(joint - joint.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)
        return w, resp, np.exp(log_pi), float(np.logaddexp.reduce(joint, axis=1).sum())

    one = fit(np.stack([start, np.zeros(m)]))
    common = log_likelihoods(start[None], tastes.intercept)[:, 0]
    two = fit(np.stack([start, tastes.taste[np.argmax(tastes.log_likelihood - common)], np.zeros(m)]))
    if 2 * (two[3] - one[3]) > 2 * (m + 1):  # AIC: the second taste's M weights + its mixing share
        w, resp, pi, _ = two
        major = int(np.argmax(pi[:2]))
        return w[major], resp[:, major], 2
    return one[0][0], one[1][:, 0], 1


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
    decisive = votes.filter(pl.col("vote").is_in([0.0, 1.0])).select(
        pl.col("pair_id") if integer_ids else pl.col("pair_id").cast(pl.String), scorer=pl.col("scorer").cast(pl.String).cast(pl.Categorical), _vote0=pl.col("vote") == 1.0,
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
        votes: output of `curation.votes.compute_votes` (pair_id, scorer, vote and, when present,
            normalized_margin: the scorer's feature; without it the vote's sign, +-1).

    Returns:
        per pair, in the order of `pairs` (LABEL_RELIABILITY_SCHEMA): scorer_log_odds (the fitted
        logistic's log-odds w . x toward image_0, null without a decisive scorer vote),
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
    pair_lazy = as_lazy(pairs, "pairs", ["pair_id", "user_id", "label_0", "image_0_id", "image_1_id"])
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
    pair_flip = labels["_flip"].to_numpy().astype(bool)
    labels = labels.drop("_lo", "_hi", "_flip")
    label_0 = labels["label_0"].to_numpy()
    is_decisive = (label_0 == 0.0) | (label_0 == 1.0)
    # Rank of each pair's id, for the one vote per (item, scorer): pairs given in pair_id order (as curate
    # gives them) need no sort, the rank is the row; otherwise only pairs whose item has several pairs
    # need their id's rank (a sort of those ids alone).
    id_rank = None  # the row
    if not labels["pair_id"].is_sorted():
        repeated = np.flatnonzero(np.bincount(pair_item, minlength=n_items)[pair_item] > 1)  # (P',) pair rows
        id_rank = np.zeros(n_pairs, np.int64)
        id_rank[repeated] = labels["pair_id"][repeated].rank("ordinal").to_numpy().astype(np.int64)
    gathered = _scorer_votes(as_lazy(votes, "votes", ["pair_id", "scorer", "vote"]), labels["pair_id"], pair_item,
                             pair_flip, id_rank, label_0, config.max_abs_margin)
    scorers, features = gathered.scorers, gathered.features

    # Decisive human labels ordered by (item, orientation, choice, user): the float sums over them (the
    # EM's statistics, each item's evidence) then do not depend on the order of the pairs.
    human_rows = np.flatnonzero(is_decisive)
    user_of_row = _dense_codes(labels.select("user_id"))  # (P,) order-free codes, like pair_item
    human_rows = human_rows[_argsort_by(4 * pair_item[human_rows] + 2 * pair_flip[human_rows]
                                        + (label_0[human_rows] == 1.0), user_of_row[human_rows])]
    # annotators with a decisive label, by sorted user_id: names from each code's first row (no string per label)
    n_codes = int(user_of_row.max()) + 1 if n_pairs else 0
    present = np.flatnonzero(np.bincount(user_of_row[human_rows], minlength=n_codes))  # (W,) codes, ascending
    code_index = np.zeros(n_codes, np.int64)
    code_index[present] = np.arange(present.size)
    code_of_row = code_index[user_of_row[human_rows]]  # (R,) index into present (np.unique's inverse, no sort)
    first_row = np.full(n_codes, -1, np.int64)
    first_row[user_of_row[::-1]] = np.arange(n_pairs - 1, -1, -1)
    names = labels["user_id"].gather(first_row[present])  # (W,) in code order
    del first_row, user_of_row
    labels = labels.drop("user_id")
    by_name = np.argsort(names.to_numpy(), kind="stable") if names.len() else np.zeros(0, np.int64)
    user_names = names.gather(by_name)
    position = np.empty(by_name.size, np.int64)
    position[by_name] = np.arange(by_name.size)
    worker = position[code_of_row]  # (R,) index into user_names
    n_users = user_names.len()
    item = pair_item[human_rows]
    flipped = pair_flip[human_rows]
    chose_0 = label_0[human_rows] == 1.0
    prior = float(np.log(config.prior_first) - np.log1p(-config.prior_first))
    direction, shares = None, np.ones(n_users)
    if config.taste_model == "mixture" and len(scorers) and worker.size:
        rows = capped_rows(worker, n_users, TASTE_LABELS)  # the margins of only the labels the mixture reads
        direction, shares, _ = taste_mixture(worker[rows], chose_0[rows],
                                             features[item[rows]] * np.where(flipped[rows], -1.0, 1.0)[:, None],
                                             n_workers=n_users, ridge=config.ridge, max_labels=TASTE_LABELS)
        del rows
    fit = fit_crowd_model(worker, item, flipped, chose_0, features,
                          n_workers=n_users, ridge=config.ridge,
                          newton_steps=config.newton_steps, accuracy_prior_strength=config.accuracy_prior_strength,
                          prior_log_odds=prior, taste_share=shares, max_iter=config.max_iter, tol=config.tol,
                          initial_weight=direction)

    # Evidence toward each item's first image (orient = +1 when a row's image_0 is its item's first).
    # Each label's evidence uses its annotator's confusion measured without the annotator's own labels
    # (cross-fitting): with the in-sample a, b a heavy annotator's labels confirm themselves wherever the
    # scorers are weak (small world flips40: a = 0.79, b = 0.84 in sample, 0.54 left out).
    llr = log_likelihood_ratio(fit.effective_loo_sensitivity[worker], fit.effective_loo_specificity[worker],
                               chose_0)  # (R,) toward image_0
    human_first = np.bincount(item, llr * np.where(flipped, -1.0, 1.0), minlength=n_items)  # (I,)
    has_scorer = gathered.voted.any(axis=1)[pair_item] if scorers else np.zeros(n_pairs, bool)  # (P,)
    clip = config.max_abs_log_odds
    pair_orient = np.where(pair_flip, -1.0, 1.0)
    scorer_0 = np.clip(fit.prior_log_odds[pair_item] * pair_orient, -clip, clip)  # (P,) toward the pair's image_0
    own_0 = np.zeros(n_pairs)  # the pair's own label's evidence toward its image_0
    own_0[human_rows] = llr
    peer_0 = (human_first[pair_item] * pair_orient - own_0) if config.use_peers else np.zeros(n_pairs)
    total_0 = np.clip(scorer_0 + peer_0 + own_0, -clip, clip)
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

    # Per scorer: its weight; its (one per item) votes' confusion against the posterior truth mu and the
    # mean evidence they carry; how often its votes (all of them) agree with decisive human labels.
    n_scorers = len(scorers)
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
        spec_m[m] = ((n_votes[m] - n_0) - (q_sum - q_agree)) / (n_votes[m] - q_sum) if n_votes[m] - q_sum > 0 else np.nan
        evidence_0 = fit.weight[m] * toward_0  # the vote's evidence toward the pair's image_0
        for_0[m] = evidence_0[vote_0].mean() if n_0 else np.nan
        for_1[m] = -evidence_0[~vote_0].mean() if n_votes[m] > n_0 else np.nan
    mean = lambda x, n: np.divide(x, n, out=np.full(n_scorers, np.nan), where=n > 0)  # noqa: E731
    per_scorer = pl.DataFrame({
        "scorer": pl.Series(scorers, dtype=pl.String), "n_votes": n_votes.astype(np.int64),
        "sensitivity": sens_m, "specificity": spec_m, "reliability": (sens_m + spec_m) / 2,
        "log_odds_for_0": for_0, "log_odds_for_1": for_1,
        "agreement_with_humans": mean(gathered.agree, gathered.judged),
        "weight": fit.weight,
    }).with_columns(pl.exclude("scorer", "n_votes").fill_nan(None)).cast(SCORER_RELIABILITY_SCHEMA)

    per_annotator = pl.DataFrame({
        "user_id": user_names, "n_decisive": np.bincount(worker, minlength=n_users).astype(np.int64),
        "sensitivity": fit.effective_sensitivity, "specificity": fit.effective_specificity,
        "loo_sensitivity": fit.loo_sensitivity, "loo_specificity": fit.loo_specificity,
        "majority_taste": shares,
        # expected balanced accuracy for the majority's taste: with probability 1 - rho the annotator labels
        # by a taste of its own, taken as uninformative (1/2) about the majority's
        "reliability": 0.5 + ((fit.loo_sensitivity + fit.loo_specificity) / 2 - 0.5) * shares,
    }).cast(LABEL_MODEL_ANNOTATORS_SCHEMA)
    return per_pair, per_scorer, per_annotator


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
