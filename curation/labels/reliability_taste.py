"""The tastes of the label model (`curation.labels.reliability`, step 1): each annotator's own Bradley-Terry taste
and the mixture over annotators that finds the majority's taste and each annotator's share of it."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefcurate.curation.labels.reliability_em import _column_sums, _gram, _matvec, _sigmoid


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
        gradient = np.stack([np.bincount(worker, z[:, k] * (y - p), n_workers) for k in range(m + 1)], 1)
        gradient -= ridge * theta
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
                  n_iter: int = 50, tol: float = 1e-4,
                  max_labels: int = 200_000) -> tuple[np.ndarray, np.ndarray, int]:
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

    def logits(w: np.ndarray, c: np.ndarray) -> list[np.ndarray]:  # K arrays (R,): c_j + w_k . x_r
        return [c[worker] + _matvec(x, wk) for wk in w]

    def log_likelihoods(logit: list[np.ndarray]) -> np.ndarray:  # (W, K)
        return np.stack([_label_log_likelihood(worker, chose_0, z, n_workers) for z in logit], 1)

    def fit(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        w, c = w.copy(), tastes.intercept.copy()
        log_pi, previous = np.full(len(w), -np.log(len(w))), None
        for _ in range(n_iter):
            logit = logits(w, c)  # also each component's logit below: w_k and c change only after its use
            joint = log_likelihoods(logit) + log_pi
            resp = np.exp(joint - joint.max(axis=1, keepdims=True))
            resp /= resp.sum(axis=1, keepdims=True)  # (W, K)
            log_pi = np.log(np.maximum((resp * n_labels[:, None]).sum(0) / max(n_labels.sum(), 1.0), 1e-12))
            gradient_c, hessian_c = -ridge * c, np.full(n_workers, ridge)
            for k in range(len(w)):
                weight = resp[worker, k]  # (R,)
                p = _sigmoid(logit[k])
                residual, curvature = weight * (y - p), weight * p * (1 - p)  # (R,)
                gradient_c += np.bincount(worker, residual, n_workers)
                hessian_c += np.bincount(worker, curvature, n_workers)
                if k < len(w) - 1:  # the last component stays w = 0
                    hessian = _gram(x, curvature)  # (M, M)
                    gradient = _column_sums(x, residual) - ridge * w[k]
                    w[k] = w[k] + np.linalg.solve(hessian + ridge * np.eye(m), gradient)
            c = c + gradient_c / hessian_c
            if previous is not None and np.abs(resp - previous).max(initial=0.0) < tol:
                break
            previous = resp
        joint = log_likelihoods(logits(w, c)) + log_pi
        resp = np.exp(joint - joint.max(axis=1, keepdims=True))
        resp /= resp.sum(axis=1, keepdims=True)
        return w, resp, np.exp(log_pi), float(np.logaddexp.reduce(joint, axis=1).sum())

    one = fit(np.stack([start, np.zeros(m)]))
    common = log_likelihoods(logits(start[None], tastes.intercept))[:, 0]
    two = fit(np.stack([start, tastes.taste[np.argmax(tastes.log_likelihood - common)], np.zeros(m)]))
    if 2 * (two[3] - one[3]) > 2 * (m + 1):  # AIC: the second taste's M weights + its mixing share
        w, resp, pi, _ = two
        major = int(np.argmax(pi[:2]))
        return w[major], resp[:, major], 2
    return one[0][0], one[1][:, 0], 1
