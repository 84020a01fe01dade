"""Win-rate statistics for model-vs-model evaluation (docs/methods.md §5.4), numpy and the standard library only.

Data layout: scores of the base and the tuned model as (P, S) arrays, P prompts × S seeds, where cell (p, s) of
both arrays comes from the same prompt and the same initial noise. Each cell is one paired comparison.

- Outcome of a comparison (tuned over base): 1 win, 0 loss, 0.5 tie (exactly equal scores); the win rate is the
  mean outcome, and the tie count is always reported next to it (docs/methods.md §5.4: tie handling is unspecified
  in the papers, so it must be visible).
- Confidence interval shown by default: a **percentile bootstrap over prompts**. The S comparisons of one prompt
  share that prompt's difficulty, so they are not independent; resampling whole prompts keeps that correlation
  in every replicate. Ties also make an outcome three-valued, not Bernoulli. The **Wilson score interval** is
  computed as well: it treats all P·S comparisons as independent Bernoulli trials, which is exact only for
  S = 1 without ties and too narrow otherwise, so it is reported for comparison with papers that use it.
- **Sign test**: exact two-sided binomial test at the prompt level (a prompt is won when its mean outcome is
  above 0.5, lost when below, excluded when exactly 0.5), so its units are independent even with S > 1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import numpy as np


BOOTSTRAP_CHUNK = 512  # replicates drawn at once: a (512, P) index array stays a few MB even for P in the 1000s


def comparison_outcomes(base: np.ndarray, tuned: np.ndarray, higher_is_better: bool = True) -> np.ndarray:
    """Outcome of tuned over base per cell: 1.0 win, 0.0 loss, 0.5 tie (equal scores), same shape as the inputs."""
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if base.shape != tuned.shape:
        raise ValueError(f"base and tuned scores must be paired (same shape), got {base.shape} and {tuned.shape}")
    if base.size == 0:
        raise ValueError("no comparisons: the score arrays are empty")
    n_nan = int(np.isnan(base).sum() + np.isnan(tuned).sum())
    if n_nan:
        raise ValueError(f"{n_nan} scores are NaN: a win rate over undefined scores is meaningless")
    better = tuned > base if higher_is_better else tuned < base
    return np.where(tuned == base, 0.5, better.astype(np.float64))


def win_rate(outcomes: np.ndarray) -> float:
    """Mean outcome: (wins + 0.5 · ties) / comparisons."""
    return float(np.mean(outcomes))


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927, JASA 22:209, eq. for the "score" interval):
    centre (p̂ + z²/2n) / (1 + z²/n), half-width z/(1 + z²/n) · sqrt(p̂(1−p̂)/n + z²/4n²), with p̂ = successes/n
    and z the two-sided normal quantile. Ties enter as half successes (successes = wins + ties/2)."""
    if n < 1:
        raise ValueError(f"the Wilson interval needs at least one trial, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    z = _two_sided_z(confidence)
    p_hat, z2 = successes / n, z * z
    centre = (p_hat + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p_hat * (1 - p_hat) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(outcomes: np.ndarray, n_resamples: int = 2000, confidence: float = 0.95,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the win rate, resampling prompts (rows of the (P, S) outcomes) with
    replacement (Efron & Tibshirani 1993, §13.3, percentile interval). Each replicate's statistic is the mean
    of the drawn prompts' mean outcomes (every prompt has S comparisons, so this is the pooled win rate).
    Seeded: the same inputs and seed give the same interval."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if outcomes.ndim != 2 or outcomes.shape[0] < 1:
        raise ValueError(f"outcomes must be (prompts, seeds) with at least one prompt, got {outcomes.shape}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    alpha = _alpha(confidence)
    per_prompt = outcomes.mean(axis=1)  # (P,)
    n_prompts = per_prompt.shape[0]
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_resamples)
    for start in range(0, n_resamples, BOOTSTRAP_CHUNK):
        stop = min(start + BOOTSTRAP_CHUNK, n_resamples)
        rows = rng.integers(0, n_prompts, size=(stop - start, n_prompts))
        replicates[start:stop] = per_prompt[rows].mean(axis=1)
    low, high = np.quantile(replicates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def sign_test_pvalue(wins: int, losses: int) -> float:
    """Exact two-sided sign test (binomial, p = 1/2, ties excluded beforehand):
    P = min(1, 2 · Σ_{k ≤ min(wins, losses)} C(n, k) / 2ⁿ), n = wins + losses; 1.0 when n = 0.
    Integer arithmetic, so it is exact for any n (the final division rounds once)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be non-negative, got wins={wins}, losses={losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


@dataclass(frozen=True)
class WinRateSummary:
    """Tuned over base on one metric. `ci` is the interval named by `ci_method`; both intervals are kept."""

    n_prompts: int
    n_seeds: int
    n_comparisons: int  # n_prompts × n_seeds
    wins: int
    losses: int
    ties: int
    win_rate: float  # (wins + ties/2) / n_comparisons
    mean_base: float
    mean_tuned: float
    confidence: float
    ci_method: str  # "bootstrap" or "wilson"
    ci: tuple[float, float]
    bootstrap_ci: tuple[float, float]  # over prompts, percentile
    wilson_ci: tuple[float, float]  # comparisons treated as independent
    n_bootstrap: int
    bootstrap_seed: int
    prompt_wins: int  # prompts whose mean outcome is above 0.5
    prompt_losses: int  # ... below 0.5 (prompts at exactly 0.5 are the sign test's ties)
    sign_test_p: float  # exact two-sided binomial over prompt_wins vs prompt_losses

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


CI_METHODS = ("bootstrap", "wilson")


def summarize(base: np.ndarray, tuned: np.ndarray, *, higher_is_better: bool = True, confidence: float = 0.95,
              ci_method: str = "bootstrap", n_bootstrap: int = 2000, bootstrap_seed: int = 0) -> WinRateSummary:
    """All the statistics of tuned over base for (P, S) paired score arrays (a 1-D array means S = 1)."""
    if ci_method not in CI_METHODS:
        raise ValueError(f"unknown ci_method {ci_method!r}; valid: {', '.join(CI_METHODS)}")
    base, tuned = np.asarray(base, dtype=np.float64), np.asarray(tuned, dtype=np.float64)
    if base.ndim == 1 and tuned.ndim == 1:
        base, tuned = base[:, None], tuned[:, None]
    if base.ndim != 2:
        raise ValueError(f"scores must be (prompts, seeds), got shape {base.shape}")
    outcomes = comparison_outcomes(base, tuned, higher_is_better)
    wins, ties = int((outcomes == 1.0).sum()), int((outcomes == 0.5).sum())
    n = outcomes.size
    per_prompt = outcomes.mean(axis=1)
    prompt_wins, prompt_losses = int((per_prompt > 0.5).sum()), int((per_prompt < 0.5).sum())
    boot = bootstrap_interval(outcomes, n_bootstrap, confidence, bootstrap_seed)
    wilson = wilson_interval(wins + 0.5 * ties, n, confidence)
    return WinRateSummary(
        n_prompts=outcomes.shape[0], n_seeds=outcomes.shape[1], n_comparisons=n, wins=wins,
        losses=n - wins - ties, ties=ties, win_rate=win_rate(outcomes), mean_base=float(base.mean()),
        mean_tuned=float(tuned.mean()), confidence=confidence, ci_method=ci_method,
        ci=boot if ci_method == "bootstrap" else wilson, bootstrap_ci=boot, wilson_ci=wilson,
        n_bootstrap=n_bootstrap, bootstrap_seed=bootstrap_seed, prompt_wins=prompt_wins,
        prompt_losses=prompt_losses, sign_test_p=sign_test_pvalue(prompt_wins, prompt_losses))


def _alpha(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    return 1 - confidence


def _two_sided_z(confidence: float) -> float:
    """Normal quantile z with P(|Z| ≤ z) = confidence (1.959964 for 0.95)."""
    return NormalDist().inv_cdf(1 - _alpha(confidence) / 2)
