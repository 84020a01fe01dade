"""Small world v2: crowds of annotators as in Pick-a-Pic, each type a typed config with its truth saved.

A crowd labels the small world's image pairs. Every label is one row (same images and prompt, its own user_id),
shown in a random left/right order. Annotator types (``choose_left`` gives each one's P(picks the left image)):

- ``Reliable``: Bradley-Terry on the majority's true reward U (``world.true_reward``):
  P(left) = sigmoid(bt_scale * (U_left - U_right))  (Bradley & Terry 1952, Biometrika 39(3/4), Eq. 1).
- ``Spammer``: a coin flip, P(left) = 1/2, whatever the images.
- ``PositionBiased``: picks the left image with probability ``p_left``, whatever the images.
- ``MinorityTaste``: consistent, Bradley-Terry too, but on another weighting of the same pixel properties
  (exposure over colour): a real taste the majority does not share.

Volume is heavy-tailed as in Pick-a-Pic (a few users give most labels): label r goes to annotator k with
P proportional to 1 / (k + 1) ** zipf_exponent. A share ``multi_label_share`` of the pairs gets 2 to
``max_labels_per_pair`` labels from distinct annotators.

A scenario says which labels are noisy at a noise level t (the share of labels not from a reliable annotator):

- annotator scenarios (``crowd``, ``minority``): annotators, taken in a seeded order, become non-reliable until
  their labels make up the share t (an annotator that would overshoot is skipped); the set at a lower level is
  contained in the set at a higher one, and each non-reliable annotator's type is the one of the scenario's mix
  furthest below its target share of labels when the annotator joins;
- ``flips``: every annotator is reliable and a share t of the labels, drawn uniformly, is flipped (the
  synthetic-minority protocol of Adaptive-DPO, Wang et al. 2025, arXiv 2503.09838, §5.1), which per-annotator
  statistics cannot see.

The random numbers (annotator of each label, shown order, the Bradley-Terry draw, the flip draw) are drawn once
for a crowd, whatever the scenario and level (common random numbers): a reliable annotator's labels are the same
in every condition.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from benchmarks.smallworld.world import UTILITY_WEIGHTS


PROPERTIES = ("colour_match", "sharpness", "exposure_quality")  # the pixel properties a taste weights


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _utility(props: dict[str, np.ndarray], weights: tuple[float, float, float]) -> np.ndarray:
    return sum(w * props[k] for w, k in zip(weights, PROPERTIES, strict=True))


@dataclass(frozen=True)
class Reliable:
    """The majority's taste: Bradley-Terry on U with the world's utility weights."""
    bt_scale: float = 20.0  # P(better wins) = sigmoid(20 ΔU): ΔU = 0.1 -> 0.88, as the v1 experiment
    kind: str = "reliable"

    def choose_left(self, left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> np.ndarray:
        return _sigmoid(self.bt_scale * (_utility(left, UTILITY_WEIGHTS) - _utility(right, UTILITY_WEIGHTS)))


@dataclass(frozen=True)
class Spammer:
    """Clicks at random: P(left) = 1/2."""
    kind: str = "spammer"

    def choose_left(self, left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> np.ndarray:
        return np.full(len(left["colour_match"]), 0.5)


@dataclass(frozen=True)
class PositionBiased:
    """Clicks the left image with probability p_left, whatever the images."""
    p_left: float = 0.85  # a strong clicker: balanced accuracy 1/2, left rate 0.85 vs about 0.5 for the others
    kind: str = "position_biased"

    def choose_left(self, left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> np.ndarray:
        return np.full(len(left["colour_match"]), self.p_left)


@dataclass(frozen=True)
class MinorityTaste:
    """Consistent, but weights exposure over colour: (colour, sharpness, exposure) = weights."""
    weights: tuple[float, float, float] = (0.05, 0.25, 0.70)  # majority: (0.45, 0.35, 0.20)
    bt_scale: float = 20.0
    kind: str = "minority_taste"

    def choose_left(self, left: dict[str, np.ndarray], right: dict[str, np.ndarray]) -> np.ndarray:
        return _sigmoid(self.bt_scale * (_utility(left, self.weights) - _utility(right, self.weights)))


AnnotatorType = Reliable | Spammer | PositionBiased | MinorityTaste


@dataclass(frozen=True)
class Scenario:
    """Which labels are noisy: a mix of non-reliable annotator types (type, share of the noisy labels), or
    per-label flips (``flips=True``, mix empty)."""
    name: str
    mix: tuple[tuple[AnnotatorType, float], ...] = ()
    flips: bool = False

    def __post_init__(self) -> None:
        if self.flips == bool(self.mix):
            raise ValueError(f"scenario {self.name!r}: give either a mix of annotator types or flips=True")
        if self.mix and abs(sum(s for _, s in self.mix) - 1.0) > 1e-9:
            raise ValueError(f"scenario {self.name!r}: the mix's shares must sum to 1")


SCENARIOS: dict[str, Scenario] = {
    # Pick-a-Pic-like: spammers, position clickers and a minority-taste group
    "crowd": Scenario("crowd", ((Spammer(), 0.35), (PositionBiased(), 0.35), (MinorityTaste(), 0.30))),
    # the hard case for statistics: consistent annotators whose taste differs
    "minority": Scenario("minority", ((MinorityTaste(), 1.0),)),
    # noise no annotator statistic can see
    "flips": Scenario("flips", flips=True),
}


@dataclass(frozen=True)
class CrowdConfig:
    n_annotators: int = 60  # most labels come from ~15 of them (Zipf), enough to rank annotators
    zipf_exponent: float = 1.0  # label share of the k-th annotator ∝ 1 / (k + 1) ** s: top one ~21 % of labels
    multi_label_share: float = 0.3  # share of pairs with several labels (Pick-a-Pic repeats pairs across users)
    max_labels_per_pair: int = 3
    reliable: Reliable = field(default_factory=Reliable)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_annotators < self.max_labels_per_pair or self.max_labels_per_pair < 2:
            raise ValueError("need 2 <= max_labels_per_pair <= n_annotators")
        if not 0.0 <= self.multi_label_share <= 1.0 or self.zipf_exponent < 0:
            raise ValueError("multi_label_share must lie in [0, 1] and zipf_exponent be >= 0")


@dataclass
class Crowd:
    """The draws of one crowd, shared by every scenario and noise level. L labels, A annotators."""
    pair: np.ndarray  # (L,) int index of the labelled pair
    annotator: np.ndarray  # (L,) int in [0, A)
    swapped: np.ndarray  # (L,) bool: the pair's image b is shown on the left
    choice_draw: np.ndarray  # (L,) U(0, 1): picks left when below P(left)
    flip_draw: np.ndarray  # (L,) U(0, 1): flipped under `flips` at level t when below t
    order: np.ndarray  # (A,) the seeded order in which annotators turn non-reliable
    config: CrowdConfig

    @property
    def n_labels(self) -> int:
        return len(self.pair)


def draw_crowd(n_pairs: int, config: CrowdConfig = CrowdConfig()) -> Crowd:
    """Which annotator labels which pair, in which order, and the uniform draws of every label."""
    rng = np.random.default_rng(config.seed)
    n_labels_of = np.ones(n_pairs, dtype=np.int64)
    multi = rng.random(n_pairs) < config.multi_label_share
    n_labels_of[multi] = rng.integers(2, config.max_labels_per_pair + 1, size=int(multi.sum()))
    volume = 1.0 / np.arange(1, config.n_annotators + 1) ** config.zipf_exponent
    p = volume / volume.sum()
    pair, annotator = [], []
    for m, k in enumerate(n_labels_of):  # distinct annotators within a pair, each drawn with the Zipf weights
        pair += [m] * int(k)
        annotator += rng.choice(config.n_annotators, size=int(k), replace=False, p=p).tolist()
    n = len(pair)
    return Crowd(np.array(pair), np.array(annotator), rng.random(n) < 0.5, rng.random(n), rng.random(n),
                 rng.permutation(config.n_annotators), config)


@dataclass
class Labels:
    """A crowd's labels in one condition, with the truth of every label and annotator."""
    left_is_a: np.ndarray  # (L,) bool: image a of the pair is shown on the left (image_0)
    label_left: np.ndarray  # (L,) 1.0 = the left image preferred
    noisy: np.ndarray  # (L,) bool: from a non-reliable annotator, or flipped
    annotator_kind: list[str]  # (A,) each annotator's type name
    annotator_config: list[dict]  # (A,) each annotator's type parameters

    def truth(self, crowd: Crowd) -> dict:
        """JSON-able truth: per annotator (user_id, kind, parameters, labels) and per label noisy flags."""
        n_labels = np.bincount(crowd.annotator, minlength=len(self.annotator_kind))
        return {"annotators": [{"user_id": user_id(j), "kind": k, "config": c, "n_labels": int(n)}
                               for j, (k, c, n) in enumerate(zip(self.annotator_kind, self.annotator_config,
                                                                 n_labels, strict=True))],
                "noisy_label_share": float(self.noisy.mean())}


def user_id(j: int) -> str:
    return f"user-{j:03d}"


def non_reliable_annotators(crowd: Crowd, scenario: Scenario, levels: tuple[float, ...]) -> dict[float, dict[int, AnnotatorType]]:
    """Level t -> {annotator: type} of the annotators whose labels are noisy; nested in t (see the module doc)."""
    if any(not 0.0 <= t < 1.0 for t in levels):
        raise ValueError(f"noise levels must lie in [0, 1), got {levels}")
    volume = np.bincount(crowd.annotator, minlength=crowd.config.n_annotators)
    chosen: dict[int, AnnotatorType] = {}
    per_type = np.zeros(len(scenario.mix))
    out = {}
    for t in sorted(levels):
        target = t * crowd.n_labels
        for j in crowd.order:
            total = sum(volume[k] for k in chosen)
            if total >= target - 0.5:
                break
            if j in chosen or volume[j] == 0 or total + volume[j] > target + 0.01 * crowd.n_labels:
                continue
            k = int(np.argmax([s * max(target, 1) - n for (_, s), n in zip(scenario.mix, per_type, strict=True)]))
            chosen[int(j)] = scenario.mix[k][0]
            per_type[k] += volume[j]
        out[t] = dict(chosen)
    return out


def plant_crowd_labels(crowd: Crowd, props_a: dict[str, np.ndarray], props_b: dict[str, np.ndarray],
                       scenario: Scenario, level: float,
                       noisy_annotators: dict[int, AnnotatorType] | None = None) -> Labels:
    """The labels of one condition. props_a / props_b: per pair (N,) pixel properties of images a and b."""
    if scenario.flips or level == 0.0:
        noisy_annotators = {}
    elif noisy_annotators is None:
        noisy_annotators = non_reliable_annotators(crowd, scenario, (level,))[level]
    a = {k: v[crowd.pair] for k, v in props_a.items()}  # (L,) per label
    b = {k: v[crowd.pair] for k, v in props_b.items()}
    left = {k: np.where(crowd.swapped, b[k], a[k]) for k in PROPERTIES}
    right = {k: np.where(crowd.swapped, a[k], b[k]) for k in PROPERTIES}
    types: list[AnnotatorType] = [noisy_annotators.get(j, crowd.config.reliable)
                                  for j in range(crowd.config.n_annotators)]
    p_left = np.empty(crowd.n_labels)
    for j, kind in enumerate(types):
        mine = crowd.annotator == j
        if mine.any():
            p_left[mine] = kind.choose_left({k: v[mine] for k, v in left.items()},
                                            {k: v[mine] for k, v in right.items()})
    label = (crowd.choice_draw < p_left).astype(np.float64)
    noisy = np.isin(crowd.annotator, list(noisy_annotators))
    if scenario.flips:
        noisy = crowd.flip_draw < level
        label = np.where(noisy, 1.0 - label, label)
    return Labels(~crowd.swapped, label, noisy, [t.kind for t in types], [asdict(t) for t in types])
