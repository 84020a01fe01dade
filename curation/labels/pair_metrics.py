"""Adaptive-DPO's minority-instance-aware metric, computed offline from scorer margins.

Adaptive-DPO (Zhang et al., "When Preferences Diverge", arXiv 2503.16921; official code
`fanfanffff1/Adaptive-DPO` `dpo_train_un.py::cal_un_wy_wstd`, `docs/methods.md` §2.3-2.4) scores each
pair with K "annotators" (there: the model and two EMA copies; here: the preference scorers, and
optionally the human label as one more annotator):

    s_k = rho * l_hat_k                       (l_hat_k: annotator k's margin toward the labelled winner)
    c   = (1/K) sum_k sigmoid(s_k)            intra-annotator confidence in the given label
    v   = min(std_k(s_k), cap)                inter-annotator (in)stability; unbiased std (ddof=1)
    u   = (1 - c) * v                         Eq. 13: the minority score, in [0, 1]
                                              (stability_term "none", the default here: u = 1 - c)
    W   = 1 / (k1 * u + c1)                   Eq. 15 reweighting ("linear"; other weight_types below)
    Gamma = -u^2 / beta + offset              Eq. 15 adaptive margin ("quadratic"), used as
                                              -log sigmoid(beta * l - Gamma) in the DPO loss

Where the offline form necessarily differs from the official online one:
- Normalisation. The official code L2-normalises each annotator's logits over the per-device batch,
  l_hat_i = l_i / sqrt(sum_j l_j^2), so u depends on the batch size B (|l_hat| ~ 1/sqrt(B)). Here the
  margins are normalised once over the whole dataset (`prefcurate.curation.labels.votes`, normalized_margin =
  margin / rms of that scorer's margins), and the batch scale is restored explicitly:
  l_hat = normalized_margin / sqrt(reference_batch_size), the expected value of the batch form for
  a batch of that size. This makes u batch-free and reproducible, at the official scale.
- Offset. The official margin adds the detached batch mean of the *model's* DPO logits, which does
  not exist before training. offset = 0 ("zero", default: the trainer can add its live batch mean)
  or the dataset mean of the annotators' mean l_hat toward the label ("dataset_mean").
- Annotators. Scorers judge the images, not the model's implicit reward; a high u therefore means
  "the label goes against the scorers, and the scorers disagree among themselves".
- Stability. The official annotators (a model and its EMA copies) have nearly equal logits, so
  their std is small and v varies. Independent scorers disagree by about one normalised margin,
  i.e. |s| differences of ~3.75, so the std hits the cap of 1 on 99.7-99.8 % of the embedded
  sample's pairs (pixel scorers + human, seeds 0-2): v alone ranks the labels that go against the
  planted truth at AUROC 0.50. Spreads that do vary (the uncapped std; the std of sigmoid(s); the std
  of rank-normalised margins) reach AUROC 0.59-0.73 alone, but every u = (1 - c) v built from them
  ranks worse (0.77-0.84) than 1 - c (0.82-0.85). So v is dropped by default
  (stability_term "none": u = 1 - c; the `stability` column still reports the capped std), and
  "capped_std" keeps the official form.

Ties. A pair whose training label is a tie (0.5) or missing has no labelled winner: its
confidence, stability, minority_score, weight and margin are null (Diffusion-DPO drops such
pairs). With fewer than 2 annotators the std is undefined: stability, minority_score, weight and
margin are null under stability_term "capped_std" (under "none" only stability is). A tied scorer
(margin 0) is an annotator with s = 0 (confidence 1/2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl

from prefcurate.curation.labels.votes import as_lazy
from prefcurate.data_schemas import adaptive
from prefcurate.data_schemas.adaptive import (  # noqa: F401  (re-exported)
    MARGIN_TYPES, WEIGHT_TYPES, MarginType, WeightType,
)


MARGIN_OFFSETS = ("zero", "dataset_mean")
LABEL_SOURCES = ("human", "consensus")
STABILITY_TERMS = ("none", "capped_std")

PAIR_METRICS_SCHEMA = {
    "pair_id": pl.String, "confidence": pl.Float64, "stability": pl.Float64, "minority_score": pl.Float64,
    "weight": pl.Float64, "margin": pl.Float64, "n_annotators": pl.Int64,
}


@dataclass(frozen=True)
class PairMetricsConfig:
    """Defaults are the official README run (SD1.5, `docs/methods.md` §2.5) unless said otherwise."""

    rho: float = adaptive.RHO
    """`logits_rho` with `use_logits_normalization=True`: sharpens l_hat before the sigmoid."""
    reference_batch_size: int = adaptive.REFERENCE_BATCH_SIZE
    """README `train_batch_size`: the batch whose L2 normalisation the dataset-wide form imitates
    (l_hat = normalized_margin / sqrt(B)); at B = 16 a typical |s| is 15/4 = 3.75."""
    std_cap: float = adaptive.STD_CAP
    """Cap on the annotators' std (`min(std, 1)` in `cal_un_wy_wstd`), keeps u in [0, 1]."""
    stability_term: Literal["none", "capped_std"] = "none"
    """How v enters u: "capped_std" is the official u = (1 - c) min(std, cap); "none" uses u = 1 - c,
    because with scorers as annotators the capped std is 1 on ~99.8 % of pairs and adds no ranking
    power (module docstring: the measurement)."""
    k1: float = adaptive.K1
    """`rewight_temparature`: how fast W falls with u (W = 1/11 at u = 1 for "linear")."""
    c1: float = adaptive.C1
    """`rewight_intercept`: W = 1/c1 for a pair with u = 0."""
    weight_type: WeightType = adaptive.WEIGHT_TYPE
    """Official default "linear"; the code's alternatives are "quadratic", "sigmoid", "sqrt"."""
    beta: float = adaptive.BETA_DPO
    """`beta_dpo` of the README run; Gamma's u-term is divided by it."""
    margin_type: MarginType = adaptive.MARGIN_TYPE
    """Official default "quadratic" (u^2 / beta); "linear" uses u / beta."""
    margin_scale: float = adaptive.MARGIN_SCALE
    """Multiplies the u-term of Gamma. 1 reproduces the code, where the term is at most 1e-3 at
    beta = 1000 and so almost negligible (`docs/methods.md` §2.4 scale caveat); raise it for a real margin."""
    margin_offset: Literal["zero", "dataset_mean"] = "zero"
    """Stand-in for the batch-mean logit term of Gamma (module docstring)."""
    use_human_annotator: bool = True
    """Count the human label as one more annotator (this project's addition; off = scorers only)."""
    human_pseudo_margin: float = 1.0
    """The human annotator's normalized margin toward its own choice: one typical scorer margin.
    A human tie gives 0. Only used when use_human_annotator is True."""
    label_source: Literal["human", "consensus"] = "human"
    """The pair's training label whose winner is scored: human label_0 or the consensus label."""

    def __post_init__(self) -> None:
        choices = {"weight_type": (self.weight_type, WEIGHT_TYPES), "margin_type": (self.margin_type, MARGIN_TYPES),
                   "stability_term": (self.stability_term, STABILITY_TERMS),
                   "margin_offset": (self.margin_offset, MARGIN_OFFSETS),
                   "label_source": (self.label_source, LABEL_SOURCES)}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"{name}={value!r}; expected one of {allowed}")
        if self.rho <= 0 or self.beta <= 0 or self.reference_batch_size < 1 or self.std_cap <= 0:
            raise ValueError(f"rho, beta, std_cap must be > 0 and reference_batch_size >= 1; got rho={self.rho}, "
                             f"beta={self.beta}, std_cap={self.std_cap}, "
                             f"reference_batch_size={self.reference_batch_size}")
        if self.c1 <= 0 and self.weight_type in ("linear", "quadratic"):
            raise ValueError(f"c1={self.c1} must be > 0 for weight_type={self.weight_type!r} (W = 1/(k1*u + c1))")


def reweight(u: pl.Expr, config: PairMetricsConfig) -> pl.Expr:
    """Adaptive-DPO weight W(u) = 1 / `data_schemas.adaptive.weight_denominator` (`docs/methods.md` §2.4)."""
    return 1.0 / adaptive.weight_denominator(u, config.weight_type, config.k1, config.c1)


def adaptive_margin(u: pl.Expr, offset: pl.Expr | float, config: PairMetricsConfig) -> pl.Expr:
    """Adaptive-DPO margin Gamma = -scale * u^2 / beta + offset ("quadratic"; "linear": u / beta), beta being
    the code's beta_dpo (`prefcurate.data_schemas.adaptive.margin`)."""
    return adaptive.margin(u, offset, beta_dpo=config.beta, margin_type=config.margin_type,
                           margin_scale=config.margin_scale)


def pair_metrics(
    votes: pl.DataFrame | pl.LazyFrame,
    pairs: pl.DataFrame | pl.LazyFrame,
    config: PairMetricsConfig = PairMetricsConfig(),
    *,
    consensus: pl.DataFrame | pl.LazyFrame | None = None,
) -> pl.DataFrame:
    """DataFrame[pair_id, confidence, stability, minority_score, weight, margin, n_annotators],
    one row per pair of `pairs`, in its order (formulas in the module docstring).

    Args:
        votes: output of `prefcurate.curation.labels.votes.compute_votes` (normalized_margin is used).
        pairs: columns pair_id, label_0.
        config: see `PairMetricsConfig`.
        consensus: output of `prefcurate.curation.labels.consensus.consensus`; required when config.label_source is
            "consensus" (its consensus_label is then the labelled winner).
    """
    pair_frame = as_lazy(pairs, "pairs", ["pair_id", "label_0"]).select(
        pl.col("pair_id").cast(pl.String), human=pl.col("label_0").cast(pl.Float64))
    if config.label_source == "consensus":
        if consensus is None:
            raise ValueError("label_source='consensus' needs the consensus frame (consensus=...)")
        labels = as_lazy(consensus, "consensus", ["pair_id", "consensus_label"]).select("pair_id", "consensus_label")
        pair_frame = pair_frame.join(labels, on="pair_id", how="left", maintain_order="left").with_columns(
            label=pl.col("consensus_label"))
    else:
        pair_frame = pair_frame.with_columns(label=pl.col("human"))
    pair_frame = pair_frame.select("pair_id", "human", "label").with_row_index("_row").collect()
    voted = (as_lazy(votes, "votes", ["pair_id", "normalized_margin"])
             .select(pl.col("pair_id").cast(pl.String), pl.col("normalized_margin").cast(pl.Float64))
             .join(pair_frame.lazy().select("pair_id", "_row"), on="pair_id", how="inner", maintain_order="left")
             .collect())
    row = voted["_row"].to_numpy().astype(np.int64)  # (V,) the pair of each vote
    margin = voted["normalized_margin"].fill_null(np.nan).to_numpy()  # (V,); a null adds nothing to the sums
    # Summed by np.bincount in the order of the votes: polars' parallel group_by sums vary in the last
    # bits from run to run, and curate must be reproducible.
    given = ~np.isnan(margin)
    sums = {"_k": np.bincount(row, minlength=pair_frame.height).astype(np.uint32),
            "_sig0": np.bincount(row, np.where(given, _sigmoid(_scale(config) * margin), 0.0), pair_frame.height),
            "_m": np.bincount(row, np.where(given, margin, 0.0), pair_frame.height),
            "_t2": np.bincount(row, np.where(given, margin**2, 0.0), pair_frame.height)}
    return pair_metrics_from_sums(pair_frame.drop("_row").with_columns(
        **{name: pl.Series(name, value) for name, value in sums.items()}), config)


def _scale(config: PairMetricsConfig) -> float:
    """s = scale * (normalized margin toward the label): rho / sqrt(B) (module docstring)."""
    return config.rho / math.sqrt(config.reference_batch_size)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def wide_sums(normalized_margin: np.ndarray, voted: np.ndarray, config: PairMetricsConfig) -> dict[str, np.ndarray]:
    """The per-pair sums over the scorer annotators that `pair_metrics_from_sums` needs, from wide arrays:
    normalized_margin and voted (M scorers, P pairs), voted[m, p] = scorer m voted on pair p. Summed in
    scorer order, as `pair_metrics` sums the long votes (grouped by scorer): the same floats bit for bit
    (adding 0.0 for a missing vote changes no sum)."""
    scale, n_pairs = _scale(config), normalized_margin.shape[1]
    sums = {"_k": voted.sum(axis=0, dtype=np.uint32), "_sig0": np.zeros(n_pairs), "_m": np.zeros(n_pairs),
            "_t2": np.zeros(n_pairs)}
    with np.errstate(invalid="ignore", over="ignore"):
        for m, v in zip(normalized_margin, voted):
            given = v & ~np.isnan(m)  # a NaN margin (two infinite scores) is a vote that adds nothing
            sums["_sig0"] += np.where(given, _sigmoid(scale * m), 0.0)
            sums["_m"] += np.where(given, m, 0.0)
            sums["_t2"] += np.where(given, m**2, 0.0)
    return sums


def pair_metrics_from_sums(frame: pl.DataFrame | pl.LazyFrame, config: PairMetricsConfig = PairMetricsConfig()
                           ) -> pl.DataFrame:
    """PAIR_METRICS_SCHEMA from per-pair sums (one row per row of `frame`, in its order): the formulas of
    the module docstring. `pair_metrics` computes the sums from long votes, the curate stage from a
    chunk's wide score columns (`wide_sums`).

    frame: pair_id (optional: without it the result has none either), human (label_0), label (the
    training label: human, or the consensus label), and over the pair's scorer votes _k (count), _sig0
    (sum of sigmoid(scale * normalized margin toward image_0)), _m (sum of the normalized margins toward
    image_0) and _t2 (sum of their squares); null sums count as 0."""
    scale = _scale(config)
    # +1: the labelled winner is image_0, -1: image_1, null: tie or no label (excluded). The sums are
    # toward image_0; the direction is applied here, using sigmoid(-x) = 1 - sigmoid(x).
    pair_frame = frame.lazy().with_columns(
        _direction=pl.when(pl.col("label") == 1.0).then(1.0).when(pl.col("label") == 0.0).then(-1.0))
    has_ids = "pair_id" in pair_frame.collect_schema()
    schema = {k: v for k, v in PAIR_METRICS_SCHEMA.items() if k != "pair_id" or has_ids}
    direction = pl.col("_direction")
    k = pl.col("_k").fill_null(0)
    sig = pl.when(direction > 0).then(pl.col("_sig0")).otherwise(k - pl.col("_sig0")).fill_null(0.0)
    t, t2 = (direction * pl.col("_m")).fill_null(0.0), pl.col("_t2").fill_null(0.0)  # sums of margins toward label
    if config.use_human_annotator:
        # The human's own choice as one more annotator: +pseudo-margin toward its winner, 0 for a
        # tie, negative when the training label (consensus) goes against it.
        has_human = pl.col("human").is_not_null()
        human = pl.col("_direction") * config.human_pseudo_margin * (2.0 * pl.col("human") - 1.0)
        k = k + has_human.cast(pl.UInt32)
        sig = sig + pl.when(has_human).then(1.0 / (1.0 + (-scale * human).exp())).otherwise(0.0)
        t = t + pl.when(has_human).then(human).otherwise(0.0)
        t2 = t2 + pl.when(has_human).then(human**2).otherwise(0.0)
    decided = pl.col("_direction").is_not_null() & (pl.col("n_annotators") > 0)
    # unbiased std of s = scale * toward over the K annotators: scale * sqrt((sum t^2 - (sum t)^2 / K) / (K - 1))
    std = scale * ((pl.col("_t2") - pl.col("_t") ** 2 / pl.col("n_annotators")).clip(0.0)
                   / (pl.col("n_annotators") - 1)).sqrt()
    if config.margin_offset == "dataset_mean":
        mean_toward = (pl.col("_t") / pl.col("n_annotators")).filter(decided).mean()
        offset: pl.Expr | float = mean_toward / math.sqrt(config.reference_batch_size)
    else:
        offset = 0.0
    return (
        pair_frame
        .with_columns(n_annotators=k.cast(pl.Int64), _sig=sig, _t=t, _t2=t2)
        .with_columns(confidence=pl.when(decided).then(pl.col("_sig") / pl.col("n_annotators")),
                      stability=pl.when(decided & (pl.col("n_annotators") >= 2)).then(
                          pl.min_horizontal(std, config.std_cap)))
        .with_columns(minority_score=(1.0 - pl.col("confidence"))
                      * (pl.col("stability") if config.stability_term == "capped_std" else 1.0))
        .with_columns(weight=reweight(pl.col("minority_score"), config),
                      margin=adaptive_margin(pl.col("minority_score"), offset, config))
        .select(list(schema))
        .cast(schema)
        .collect()
    )
