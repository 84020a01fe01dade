"""The label model's EM (`curation.labels.reliability`): Raykar et al.'s learning from crowds, a logistic truth on the
scorers' margins fitted jointly with each annotator's two-coin confusion (`fit_crowd_model`), and the column-wise
products it uses.

Model. P(item i's first image is better | x_i) = p_i = sigmoid(w . x_i) (Raykar eq. 1; no
intercept: swapping the two images negates x_i, and must negate the log-odds). Annotator j picks
image_0 with probability a_j when image_0 is better and image_1 with probability b_j when image_1
is (Raykar §2.1's sensitivity alpha and specificity beta, read on the shown order so that a
position bias shows as a_j >> b_j). EM (Raykar §2.3):
    E-step  mu_i = sigmoid(w . x_i + sum over the item's labels of lambda_j(y) * orient)
            (lambda_j as in curation.labels.reliability's docstring; orient = -1 for a flipped label), Raykar's
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
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """1 / (1 + exp(-x)), computed in one array (`out`, which may be x itself; None: a new one). Each fresh array
    of a few MB is a new mapping whose pages fault on first touch (at 1M pairs ~1/3 of the label model's CPU
    was system time), so the label model's loops reuse their buffers."""
    out = np.negative(x, out=out)
    np.exp(out, out=out)
    np.add(1.0, out, out=out)
    return np.divide(1.0, out, out=out)


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

    Model, EM and leave-one-out confusion: the module docstring.
    """
    worker = np.asarray(worker, dtype=np.int64)
    item = np.asarray(item, dtype=np.int64)
    flipped, chose_0 = np.asarray(flipped, dtype=bool), np.asarray(chose_0, dtype=bool)
    features = np.asfortranarray(features, dtype=np.float32)  # (I, M): 20 bytes an item at M = 5; columns contiguous
    if features.ndim != 2 or features.shape[0] < (int(item.max()) + 1 if item.size else 0):
        raise ValueError(f"features must be (I, M) with a row per item, got {features.shape}")
    n_items, n_features = features.shape
    if n_workers is None:
        n_workers = int(worker.max()) + 1 if worker.size else 0
    if item.size and (item.min() < 0 or worker.min() < 0 or worker.max() >= n_workers):
        raise ValueError(f"item and worker must be in [0, I) and [0, {n_workers}) (the loop's gathers rely on it)")
    orient = np.where(flipped, -1.0, 1.0).astype(np.float32)  # (R,) label's image_0 log-odds -> item's first image
    label_type = (2 * worker + chose_0).astype(np.int32 if 2 * n_workers < 2**31 else np.int64)  # (R,) (W, 2) table
    labelled = np.flatnonzero(np.bincount(item, minlength=n_items) > 0)  # items the logistic is fitted on
    labelled = labelled[::-(-labelled.size // max_fit_items)] if labelled.size > max_fit_items else labelled
    x = features[labelled].astype(np.float64, order="F")  # (I', M), columns contiguous for _newton's products
    sens, spec = np.full(n_workers, 0.7), np.full(n_workers, 0.7)
    w = np.zeros(n_features) if initial_weight is None else np.asarray(initial_weight, dtype=np.float64).copy()
    crowd = _Crowd(worker, chose_0, n_workers, accuracy_prior_strength, taste_share)
    prior = prior_log_odds + _matvec(features, w.astype(np.float32)).astype(np.float64)  # (I,)
    evidence = np.bincount(item, crowd.lambdas(sens, spec)[label_type] * orient, n_items)  # (I,)
    rows = np.empty(item.size)  # (R,) per-label buffer of the loop (no fresh array per step: `_sigmoid`)
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        log_odds = prior + evidence  # (I,)
        mu = _sigmoid(log_odds)  # E-step
        np.take(log_odds, item, out=rows, mode="clip")  # indices checked above; "raise" would buffer the gather
        rows *= orient  # P(label's image_0 better), as log-odds
        new_sens, new_spec = crowd.confusion(_sigmoid(rows, out=rows))
        new_w = _newton(x, mu[labelled], w, prior_log_odds, ridge, newton_steps) if n_features else w.copy()
        change = max(np.abs(new_sens - sens).max(initial=0.0), np.abs(new_spec - spec).max(initial=0.0),
                     np.abs(new_w - w).max(initial=0.0))
        sens, spec, w = new_sens, new_spec, new_w
        prior = prior_log_odds + _matvec(features, w.astype(np.float32)).astype(np.float64)
        np.take(crowd.lambdas(sens, spec), label_type, out=rows, mode="clip")
        rows *= orient  # each label's evidence toward its item's first image
        evidence = np.bincount(item, rows, n_items)
        if change < tol:
            break
    log_odds = prior + evidence
    del evidence
    loo = _leave_one_out(log_odds, crowd.lambdas(sens, spec)[label_type] * orient, item, worker, n_workers) * orient
    # Labels with no evidence at all once their own are left out (flat prior, no scorer, no peer) say
    # nothing about their annotator: they are left out rather than counted as coin flips.
    loo_sens, loo_spec = crowd.confusion(_sigmoid(loo), loo != 0)
    return CrowdFit(sens, spec, w, prior, log_odds, loo_sens, loo_spec, n_iter, *crowd.effective(sens, spec),
                    *crowd.effective(loo_sens, loo_spec))


class _Crowd:
    """The annotators' side of the EM (R decisive labels, W annotators): the effective confusion, each label
    type's evidence and the shrunk M-step of `fit_crowd_model`."""

    def __init__(self, worker: np.ndarray, chose_0: np.ndarray, n_workers: int, strength: float,
                 taste_share: np.ndarray | None):
        self.worker, self.chose_0, self.n_workers, self.strength = worker, chose_0, n_workers, strength
        self.rho = np.ones(n_workers) if taste_share is None else np.asarray(taste_share, dtype=float)  # (W,)
        # (W,) labels and labels "image_0" per annotator, the M-step's counts over all labels (`confusion`)
        self.n_labels = np.bincount(worker, minlength=n_workers)
        self.n_chose_0 = np.bincount(worker, chose_0, n_workers)
        self.left = (self.n_chose_0 + 1.0) / (self.n_labels + 2.0)  # (W,) q_j, own rate of image_0 (Laplace-smoothed)

    def effective(self, sens: np.ndarray, spec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(a', b'), each (W,): the confusion of an annotator that labels by the majority's taste w.p. rho."""
        rho, left = self.rho, self.left
        return rho * sens + (1 - rho) * left, rho * spec + (1 - rho) * (1 - left)

    def lambdas(self, sens: np.ndarray, spec: np.ndarray) -> np.ndarray:
        """(2W,) evidence toward the label's image_0 of label type 2 j + chose_0: label image_1, label image_0."""
        sens, spec = self.effective(sens, spec)
        return np.stack([np.log1p(-sens) - np.log(spec), np.log(sens) - np.log1p(-spec)], axis=1).ravel()

    def confusion(self, q: np.ndarray, use: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The shrunk M-step (a, b), each (W,), from q (R,) = P(label's image_0 better); use (R,) bool, the
        labels counted (None: all)."""
        worker, chose_0, n_workers, strength, eps = self.worker, self.chose_0, self.n_workers, self.strength, 1e-4
        if use is None:
            n_labels, n_chose_0 = self.n_labels.astype(float), self.n_chose_0
        else:
            q = np.where(use, q, 0.0)
            n_labels = np.bincount(worker, use, n_workers).astype(float)
            n_chose_0 = np.bincount(worker, chose_0 & use, n_workers)
        q_sum = np.bincount(worker, q, n_workers)
        q_agree = np.bincount(worker, np.where(chose_0, q, 0.0), n_workers)
        not_q_sum = n_labels - q_sum
        not_q_agree = (n_labels - n_chose_0) - (q_sum - q_agree)
        pooled_a = q_agree.sum() / max(q_sum.sum(), eps)
        pooled_b = not_q_agree.sum() / max(not_q_sum.sum(), eps)
        return (((q_agree + strength * pooled_a) / (q_sum + strength)).clip(eps, 1 - eps),
                ((not_q_agree + strength * pooled_b) / (not_q_sum + strength)).clip(eps, 1 - eps))


def _newton(x: np.ndarray, target: np.ndarray, w: np.ndarray, offset: float, ridge: float, steps: int) -> np.ndarray:
    """(M,) w after `steps` Newton-Raphson steps on the ridge cross-entropy of sigmoid(offset + x w) against
    target (I',), x (I', M)."""
    w = w.copy()
    for _ in range(steps):
        p = _sigmoid(offset + _matvec(x, w))
        gradient = _column_sums(x, target - p) - ridge * w
        hessian = _gram(x, p * (1 - p)) + ridge * np.eye(x.shape[1])
        w = w + np.linalg.solve(hessian, gradient)
    return w


def _leave_one_out(log_odds: np.ndarray, row_evidence: np.ndarray, item: np.ndarray, worker: np.ndarray,
                   n_workers: int) -> np.ndarray:
    """(R,) each label's item log-odds (I,) toward the item's first image less the evidence of every label of
    its annotator on that item (an annotator may label the same two images twice); row_evidence (R,) is each
    label's own. Only items with several labels need the (item, annotator) sums."""
    loo = log_odds[item] - row_evidence
    shared = np.flatnonzero(np.bincount(item, minlength=log_odds.size)[item] > 1)
    if shared.size:  # an annotator's other labels on the same item are its own too
        _, key = np.unique(item[shared] * max(n_workers, 1) + worker[shared], return_inverse=True)
        loo[shared] = log_odds[item[shared]] - np.bincount(key, row_evidence[shared])[key]
    return loo
