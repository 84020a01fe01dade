"""Deterministic synthetic Pick-a-Pic v2 shards with a planted truth table.

Every later stage (ingest, scorers, annotator statistics, weighting) is tested against this sample.
`generate_sample(out_dir, config)` writes:

- `pickapic/train-0000i-of-0000N.parquet`: the exact Pick-a-Pic v2 schema (`pickapic_arrow_schema()`,
  docs/data-and-scorers.md §1.2). Ties are 0.5/0.5 with best_image_uid "". URLs are dead (.invalid host).
- `truth/annotators.parquet`: user_id, annotator_type (ANNOTATOR_TYPES), n_rows (rows in the shards).
- `truth/rows.parquet`: one row per shard row, in shard order (row_number = position in the shards read in
  order; shard = file index). true_label_0 is the majority utility's winner (null for identical images);
  chosen_label_0 is what the annotator picked; given_label_0/1 are what the shard holds (they differ from
  the choice only on nan_label / inconsistent_labels rows); label_agrees_with_majority compares the choice
  with the truth (null for ties and identical images); planted_defect is null or one of DEFECT_KINDS, with
  defect_detail and duplicate_of (row_number of the original of an exact duplicate row); then per image
  colour_match, sharpness, blur_radius (px), exposure, exposure_quality and utility, suffixed _0 and _1.

Annotators: reliable (Bradley-Terry on the majority utility U), minority (the same, but it flips the sign
of sharpness: it prefers soft images; it is shown pairs where sharpness decides), position_biased (image_0
with P = position_bias), spammer (coin flip), tie_prone (ties with P = tie_prone_tie_rate, else reliable).
Images come from prefcurate.curation.synthetic.scene: colour match, sharpness and exposure are measurable from pixels.
"""
from __future__ import annotations

import io
import math
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from prefcurate.curation.synthetic.palette import COLOR_NAMES
from prefcurate.curation.synthetic.scene import render_scene

ANNOTATOR_TYPES = ("reliable", "minority", "position_biased", "spammer", "tie_prone")
DEFECT_KINDS = ("duplicate_row", "corrupt_image", "nan_label", "inconsistent_labels", "empty_prompt",
                "identical_images")
OBJECTS = {"bicycle": "triangle", "car": "rectangle", "umbrella": "ellipse", "teapot": "ellipse", "kite": "diamond",
           "house": "rectangle", "balloon": "ellipse", "chair": "rectangle", "boat": "triangle", "lamp": "diamond"}
SETTINGS = ("on a quiet street", "in a sunny field", "on a wooden table", "under a cloudy sky", "by the sea",
            "in a minimalist studio")
# Prompts name only chromatic colours: white, black and grey would match the desaturated background
PROMPT_COLOURS = tuple(n for n, rgb in COLOR_NAMES.items() if max(rgb) - min(rgb) > 60)
MODELS = ("stable-diffusion-xl-beta", "stable-diffusion-2-1", "dreamlike-photoreal-2.0", "stable-diffusion-xl-1.0")
BASE_TIME_NS = 1_682_899_200 * 10**9  # 2023-05-01T00:00:00: fixed, so the same seed gives the same bytes


@dataclass(frozen=True)
class SampleConfig:
    seed: int = 0
    n_prompts: int = 150               # ~20 rows per prompt: pairs repeat, so consensus per pair is estimable
    images_per_prompt: tuple[int, int] = (4, 6)  # inclusive range; Pick-a-Pic draws pairs among 4-6 images a prompt
    n_rows: int = 3000                 # rows in the shards, duplicates included; 0.7-2 s on one shared core
    n_annotators: int = 60             # enough for per-type statistics, few enough that most have dozens of rows
    image_size: int = 64               # px; big enough for Laplacian/colour statistics, small enough for CPU tests
    # share of annotators per type (min_annotators_per_type applies first; reliable takes the remainder)
    annotator_share: dict[str, float] = field(default_factory=lambda: {
        "minority": 0.1, "position_biased": 0.1, "spammer": 0.1, "tie_prone": 0.1})
    # share of rows per type; reliable takes the remainder (~65 %), as a healthy crowd is mostly reliable
    row_share: dict[str, float] = field(default_factory=lambda: {
        "minority": 0.1, "position_biased": 0.08, "spammer": 0.08, "tie_prone": 0.09})
    min_annotators_per_type: int = 3   # later statistics need several annotators of each kind to find
    zipf_exponent: float = 0.8         # volume ~ rank^-a within a type: heavy-tailed, yet most have dozens of rows
    min_rows_per_annotator: int = 5    # nobody has too few rows to appear in per-annotator statistics
    # majority utility U = w_c*colour_match + w_s*sharpness + w_e*exposure_quality; weights sum to 1 so U is in [0, 1]
    utility_weights: tuple[float, float, float] = (0.45, 0.35, 0.20)
    bt_scale: float = 12.0             # Bradley-Terry P(0 wins) = sigmoid(scale*(U0-U1)): ~85 % majority agreement
    position_bias: float = 0.90        # P(a position-biased annotator picks image_0): docs/data-and-scorers.md §6.2
    tie_rate: float = 0.05             # P(tie) for every annotator type except tie_prone
    tie_prone_tie_rate: float = 0.40   # P(tie) for tie-prone annotators
    named_colour_rate: float = 0.5     # share of a prompt's images drawn in the named colour (at least one, not all)
    max_blur_radius: float = 2.5       # px; sharpness = 1 - radius/max; at 64 px radius 2.5 erases the 4 px checker
    max_exposure: float = 1.0          # |exposure| (gamma = 2**-exposure); exposure_quality = 1 - |exposure|/max
    png_rate: float = 0.05             # share of images stored as PNG (Pick-a-Pic mixes PNG into jpg_*)
    jpeg_quality: int = 90             # high enough that JPEG blocking does not swamp the blur signal
    duplicate_rate: float = 0.015      # each defect kind ~1.5 % of rows, at least one row each
    corrupt_image_rate: float = 0.015
    nan_label_rate: float = 0.015
    inconsistent_label_rate: float = 0.015
    empty_prompt_rate: float = 0.015
    identical_images_rate: float = 0.015
    n_shards: int = 4                  # exercise multi-file ingest
    row_groups_per_shard: int = 3      # exercise row-group iteration

    @classmethod
    def small(cls, seed: int = 0) -> SampleConfig:
        """A test-sized sample (0.2-0.5 s): still 3 annotators of every non-reliable type and every defect kind."""
        return cls(seed=seed, n_prompts=24, n_rows=900, n_annotators=24, n_shards=2, row_groups_per_shard=2)

    def __post_init__(self) -> None:
        lo, hi = self.images_per_prompt
        if not 2 <= lo <= hi:
            raise ValueError(f"images_per_prompt must be (lo, hi) with 2 <= lo <= hi, got {self.images_per_prompt}")
        for name, shares in (("annotator_share", self.annotator_share), ("row_share", self.row_share)):
            if set(shares) != set(ANNOTATOR_TYPES[1:]) or sum(shares.values()) >= 1:
                raise ValueError(f"{name} needs shares for exactly {ANNOTATOR_TYPES[1:]} summing below 1, "
                                 f"got {shares}")
        if self.n_annotators < len(ANNOTATOR_TYPES) * self.min_annotators_per_type:
            raise ValueError(f"n_annotators={self.n_annotators} is below {len(ANNOTATOR_TYPES)} types x "
                             f"min_annotators_per_type={self.min_annotators_per_type}")
        if sum(self.defect_counts().values()) > self.n_rows // 4:
            raise ValueError(f"defect counts {self.defect_counts()} exceed a quarter of n_rows={self.n_rows}")
        if not 1 <= self.n_shards <= self.n_rows // 10 or self.row_groups_per_shard < 1:
            raise ValueError(f"need 1 <= n_shards <= n_rows/10 and row_groups_per_shard >= 1, got "
                             f"{self.n_shards}, {self.row_groups_per_shard}")
        if abs(sum(self.utility_weights) - 1) > 1e-9:
            raise ValueError(f"utility_weights must sum to 1, got {self.utility_weights}")

    def defect_counts(self) -> dict[str, int]:
        """Rows planted per defect kind: rate * n_rows, at least one of each."""
        rates = (self.duplicate_rate, self.corrupt_image_rate, self.nan_label_rate, self.inconsistent_label_rate,
                 self.empty_prompt_rate, self.identical_images_rate)
        return {kind: max(1, round(rate * self.n_rows)) for kind, rate in zip(DEFECT_KINDS, rates, strict=True)}


@dataclass(frozen=True)
class SamplePaths:
    root: Path
    pickapic_dir: Path        # out_dir/pickapic: the shards and nothing else
    shards: tuple[Path, ...]  # out_dir/pickapic/train-0000i-of-0000N.parquet, in row order
    annotators: Path          # out_dir/truth/annotators.parquet
    rows: Path                # out_dir/truth/rows.parquet


def pickapic_arrow_schema() -> pa.Schema:
    """The exact column names and types of a Pick-a-Pic v2 Parquet shard (docs/data-and-scorers.md §1.2)."""
    s, b, f, i = pa.string(), pa.bool_(), pa.float64(), pa.int64()
    return pa.schema([
        ("are_different", b), ("best_image_uid", s), ("caption", s), ("created_at", pa.timestamp("ns")),
        ("has_label", b), ("image_0_uid", s), ("image_0_url", s), ("image_1_uid", s), ("image_1_url", s),
        ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", f), ("label_1", f), ("model_0", s),
        ("model_1", s), ("ranking_id", i), ("user_id", i), ("num_example_per_prompt", i), ("__index_level_0__", i),
    ])


def majority_utility(colour_match: np.ndarray, sharpness: np.ndarray, exposure_quality: np.ndarray,
                     weights: tuple[float, float, float]) -> np.ndarray:
    """U = w_c*colour_match + w_s*sharpness + w_e*exposure_quality, every input in [0, 1], so U is in [0, 1]."""
    w_c, w_s, w_e = weights
    return w_c * colour_match + w_s * sharpness + w_e * exposure_quality


def generate_sample(out_dir: str | Path, config: SampleConfig | None = None) -> SamplePaths:
    """Write Pick-a-Pic-shaped shards and their truth tables under out_dir; the same config gives the same bytes."""
    cfg = config or SampleConfig()
    rng = np.random.default_rng(cfg.seed)
    images, prompts = _images(cfg, rng)
    annotators = _annotators(cfg, rng)
    rows = _rows(cfg, rng, images, prompts, annotators)
    root = Path(out_dir)
    names = {f"train-{k:05d}-of-{cfg.n_shards:05d}.parquet" for k in range(cfg.n_shards)}
    stale = sorted(p.name for p in (root / "pickapic").glob("*.parquet") if p.name not in names)
    if stale:  # a reader globbing the folder would mix them in
        raise FileExistsError(f"{root / 'pickapic'} holds Parquet files this sample would not overwrite: {stale}; "
                              "remove them or choose another out_dir")
    (root / "pickapic").mkdir(parents=True, exist_ok=True)
    (root / "truth").mkdir(parents=True, exist_ok=True)
    shards = _write_shards(cfg, root / "pickapic", rows, images, prompts)
    rows_per_user = {int(u): 0 for u in annotators["user_id"]}
    for row in rows:
        rows_per_user[row["user_id"]] += 1
    annotator_table = pa.table({
        "user_id": pa.array(annotators["user_id"], pa.int64()),
        "annotator_type": pa.array(annotators["type"], pa.string()),
        "n_rows": pa.array([rows_per_user[int(u)] for u in annotators["user_id"]], pa.int64()),  # duplicates included
    }).sort_by("user_id")
    pq.write_table(annotator_table, root / "truth" / "annotators.parquet")
    pq.write_table(_truth_table(rows, images, prompts, cfg.n_shards), root / "truth" / "rows.parquet")
    return SamplePaths(root, root / "pickapic", shards, root / "truth" / "annotators.parquet",
                       root / "truth" / "rows.parquet")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _images(cfg: SampleConfig, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Prompts ("a red bicycle on a quiet street") and 4-6 rendered, encoded images per prompt, with properties."""
    colours, objects = list(COLOR_NAMES), list(OBJECTS)
    n_combinations = len(PROMPT_COLOURS) * len(objects) * len(SETTINGS)
    if cfg.n_prompts > n_combinations:
        raise ValueError(f"n_prompts={cfg.n_prompts} exceeds the {n_combinations} distinct prompts the templates make")
    prompts: dict[str, list] = {"caption": [], "colour": [], "images": []}  # images: indices into the image arrays
    records: list[dict] = []
    for combo in rng.choice(n_combinations, cfg.n_prompts, replace=False):
        colour = PROMPT_COLOURS[combo // (len(objects) * len(SETTINGS))]
        obj = objects[combo // len(SETTINGS) % len(objects)]
        prompts["caption"].append(f"a {colour} {obj} {SETTINGS[combo % len(SETTINGS)]}")
        prompts["colour"].append(colour)
        n_images = int(rng.integers(cfg.images_per_prompt[0], cfg.images_per_prompt[1] + 1))
        n_named = min(max(round(cfg.named_colour_rate * n_images), 1), n_images - 1)  # both kinds in every prompt
        prompts["images"].append(list(range(len(records), len(records) + n_images)))
        for named in rng.permutation(np.arange(n_images) < n_named):
            drawn = colour if named else colours[int(rng.choice([i for i, c in enumerate(colours) if c != colour]))]
            distance = np.linalg.norm(np.subtract(COLOR_NAMES[drawn], COLOR_NAMES[colour], dtype=np.float64))
            blur, exposure = rng.uniform(0, cfg.max_blur_radius), rng.uniform(-cfg.max_exposure, cfg.max_exposure)
            fmt = "PNG" if rng.random() < cfg.png_rate else "JPEG"
            image = render_scene(COLOR_NAMES[drawn], OBJECTS[obj], blur, exposure, cfg.image_size, rng)
            buffer = io.BytesIO()
            image.save(buffer, fmt, **({"quality": cfg.jpeg_quality} if fmt == "JPEG" else {}))
            records.append({
                "prompt": len(prompts["caption"]) - 1, "colour": drawn, "blur_radius": blur, "exposure": exposure,
                "colour_match": max(0.0, 1 - distance / 255),  # 1 = the named colour; RGB distance 255 or more = 0
                "uid": str(uuid.UUID(bytes=rng.bytes(16), version=4)), "format": fmt,
                "model": MODELS[int(rng.integers(len(MODELS)))], "bytes": buffer.getvalue()})
    images = {k: np.array([r[k] for r in records], dtype=object if k == "bytes" else None) for k in records[0]}
    images["sharpness"] = 1 - images["blur_radius"] / cfg.max_blur_radius
    images["exposure_quality"] = 1 - np.abs(images["exposure"]) / cfg.max_exposure
    images["utility"] = majority_utility(images["colour_match"], images["sharpness"], images["exposure_quality"],
                                         cfg.utility_weights)
    # the minority flips the sign of sharpness, preferring soft images: U_min = U - w_s*sharpness + w_s*(1 - sharpness)
    images["minority_utility"] = images["utility"] + cfg.utility_weights[1] * (1 - 2 * images["sharpness"])
    return images, prompts


def _allocate(total: int, weights: np.ndarray, floor: int) -> np.ndarray:
    """Split `total` into integers >= floor proportional to weights (largest remainder, so the sum is exact)."""
    share = (total - floor * len(weights)) * weights / weights.sum()
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: total - floor * len(weights) - counts.sum()]] += 1
    return counts + floor


def _annotators(cfg: SampleConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """user ids, planted types and Zipf-like row volumes (base rows, duplicates excluded)."""
    counts = {t: max(cfg.min_annotators_per_type, round(s * cfg.n_annotators)) for t, s in cfg.annotator_share.items()}
    counts = {"reliable": cfg.n_annotators - sum(counts.values()), **counts}
    if counts["reliable"] < cfg.min_annotators_per_type:
        raise ValueError(f"annotator_share {cfg.annotator_share} leaves {counts['reliable']} reliable annotators")
    n_base = cfg.n_rows - cfg.defect_counts()["duplicate_row"]
    type_rows = {t: round(s * n_base) for t, s in cfg.row_share.items()}
    type_rows = {"reliable": n_base - sum(type_rows.values()), **type_rows}
    types, volumes = [], []
    for kind in ANNOTATOR_TYPES:
        if type_rows[kind] < counts[kind] * cfg.min_rows_per_annotator:
            raise ValueError(f"{type_rows[kind]} {kind} rows cannot give {counts[kind]} annotators "
                             f"{cfg.min_rows_per_annotator} rows each")
        ranks = rng.permutation(counts[kind]) + 1
        volumes.append(_allocate(type_rows[kind], ranks ** -cfg.zipf_exponent, cfg.min_rows_per_annotator))
        types += [kind] * counts[kind]
    user_ids = rng.choice(np.arange(10_000, 1_000_000), cfg.n_annotators, replace=False)
    return {"user_id": user_ids.astype(np.int64), "type": np.array(types), "volume": np.concatenate(volumes)}


def _disputed_pairs(images: dict[str, np.ndarray], members: list[int], w_sharp: float) -> list[tuple[int, int]]:
    """Pairs of a prompt's images where sharpness outweighs the rest of the utility, so the majority and the
    minority rank them differently (sign(R + S) != sign(R - S) iff |S| > |R|); the best pair if none is."""
    scored = []
    for a, i in enumerate(members):
        for j in members[a + 1:]:
            s = w_sharp * (images["sharpness"][i] - images["sharpness"][j])
            r = images["utility"][i] - images["utility"][j] - s
            scored.append((abs(s) - abs(r), (i, j)))
    disputed = [pair for margin, pair in scored if margin > 0.05]  # 0.05 of U: sigmoid(12*0.05)=0.65, a clear lean
    return disputed or [max(scored)[1]]


def _choose_label(kind: str, u0: float, u1: float, cfg: SampleConfig, rng: np.random.Generator) -> float:
    """The planted annotator's label_0: 1 (image_0 wins), 0 (image_1 wins) or 0.5 (tie)."""
    if rng.random() < (cfg.tie_prone_tie_rate if kind == "tie_prone" else cfg.tie_rate):
        return 0.5
    if kind == "position_biased":
        p_first = cfg.position_bias
    elif kind == "spammer":
        p_first = 0.5
    else:  # reliable, tie_prone (majority utility) and minority (its own utility): Bradley-Terry
        p_first = _sigmoid(cfg.bt_scale * (u0 - u1))
    return 1.0 if rng.random() < p_first else 0.0


def _rows(cfg: SampleConfig, rng: np.random.Generator, images: dict[str, np.ndarray], prompts: dict[str, list],
          annotators: dict[str, np.ndarray]) -> list[dict]:
    """Every shard row in order, as dicts holding shard values plus the truth columns (row_number, defect, ...)."""
    defects = cfg.defect_counts()
    owner = rng.permutation(np.repeat(np.arange(len(annotators["type"])), annotators["volume"]))  # one per base row
    n_base = len(owner)
    kinds = [k for k in DEFECT_KINDS if k != "duplicate_row"]
    planted = rng.choice(n_base, sum(defects[k] for k in kinds), replace=False)
    defect_of: dict[int, str] = {}
    for kind, chunk in zip(kinds, np.split(planted, np.cumsum([defects[k] for k in kinds])[:-1]), strict=True):
        defect_of.update({int(row): kind for row in chunk})
    disputed = [_disputed_pairs(images, members, cfg.utility_weights[1]) for members in prompts["images"]]
    created = BASE_TIME_NS + np.cumsum(rng.integers(1, 120, n_base)) * 10**9  # a label every ~minute
    ranking = 500_000 + np.cumsum(rng.integers(1, 40, n_base))  # increasing, unique, Pick-a-Pic-like magnitudes
    base = []
    for k in range(n_base):
        kind, defect = str(annotators["type"][owner[k]]), defect_of.get(k)
        prompt = int(rng.integers(cfg.n_prompts))
        members = prompts["images"][prompt]
        if defect == "identical_images":
            i = j = int(rng.choice(members))
        elif kind == "minority":
            i, j = disputed[prompt][int(rng.integers(len(disputed[prompt])))]
        else:
            i, j = (int(x) for x in rng.choice(members, 2, replace=False))
        if rng.random() < 0.5:
            i, j = j, i
        utility = images["minority_utility"] if kind == "minority" else images["utility"]
        chosen = _choose_label(kind, utility[i], utility[j], cfg, rng)
        true = None if i == j else float(images["utility"][i] > images["utility"][j])
        row = {"prompt": prompt, "i": i, "j": j, "user_id": int(annotators["user_id"][owner[k]]), "kind": kind,
               "chosen": chosen, "true": true, "label_0": chosen, "label_1": 1 - chosen,
               "caption": prompts["caption"][prompt], "jpg_0": images["bytes"][i], "jpg_1": images["bytes"][j],
               "created_at": int(created[k]), "ranking_id": int(ranking[k]), "index": k, "defect": defect,
               "detail": None, "duplicate_of": None}
        _plant(row, defect, rng)
        base.append(row)
    sources = rng.choice([k for k in range(n_base) if k not in defect_of], defects["duplicate_row"], replace=False)
    after = {int(s): int(rng.integers(s, n_base)) for s in sorted(sources)}  # a copy lands after its original
    rows: list[dict] = []
    for k, row in enumerate(base):
        row["row_number"] = len(rows)
        rows.append(row)
        for source in (s for s, slot in after.items() if slot == k):
            copy = dict(base[source], defect="duplicate_row", duplicate_of=base[source]["row_number"],
                        detail=f"exact copy of row {base[source]['row_number']}", row_number=len(rows))
            rows.append(copy)
    return rows


def _plant(row: dict, defect: str | None, rng: np.random.Generator) -> None:
    """Apply one row-level defect in place, recording what was done in row['detail']."""
    if defect == "corrupt_image":
        side = f"jpg_{int(rng.integers(2))}"
        good = row[side]
        if rng.random() < 0.5:  # truncated: the header parses, decoding the pixels fails
            row[side] = good[: len(good) // 3]
            row["detail"] = f"{side} truncated to {len(good) // 3} of {len(good)} bytes"
        else:
            row[side] = rng.bytes(len(good))
            row["detail"] = f"{side} replaced by {len(good)} random bytes"
    elif defect == "nan_label":
        row["label_0"] = math.nan
        row["detail"] = "label_0 is NaN"
    elif defect == "inconsistent_labels":  # label_0 keeps the annotator's choice, label_1 breaks the sum
        row["label_1"] = row["label_0"] if row["label_0"] != 0.5 else 1.0
        row["detail"] = f"label_0 + label_1 = {row['label_0'] + row['label_1']}"
    elif defect == "empty_prompt":
        row["caption"] = "" if rng.random() < 0.5 else "   "
        row["detail"] = f"caption {row['caption']!r}"
    elif defect == "identical_images":
        row["detail"] = "image_1 is image_0 (same uid and bytes)"


def _write_shards(cfg: SampleConfig, directory: Path, rows: list[dict], images: dict[str, np.ndarray],
                  prompts: dict[str, list]) -> tuple[Path, ...]:
    per_prompt = np.bincount([row["prompt"] for row in rows], minlength=cfg.n_prompts)
    uid, fmt = images["uid"], images["format"]
    url = "https://pickapic-images.invalid/images/{}.{}".format  # .invalid (RFC 2606): dead like Pick-a-Pic's URLs
    winner = {1.0: "i", 0.0: "j"}
    paths = []
    for shard, chunk in enumerate(np.array_split(np.arange(len(rows)), cfg.n_shards)):
        part = [rows[k] for k in chunk]
        columns = {
            "are_different": [r["i"] != r["j"] for r in part],
            "best_image_uid": [uid[r[winner[r["chosen"]]]] if r["chosen"] in winner else "" for r in part],
            "caption": [r["caption"] for r in part],
            "created_at": [r["created_at"] for r in part],
            "has_label": [True] * len(part),
            "image_0_uid": [uid[r["i"]] for r in part],
            "image_0_url": [url(uid[r["i"]], fmt[r["i"]].lower()) for r in part],
            "image_1_uid": [uid[r["j"]] for r in part],
            "image_1_url": [url(uid[r["j"]], fmt[r["j"]].lower()) for r in part],
            "jpg_0": [r["jpg_0"] for r in part], "jpg_1": [r["jpg_1"] for r in part],
            "label_0": [r["label_0"] for r in part], "label_1": [r["label_1"] for r in part],
            "model_0": [images["model"][r["i"]] for r in part], "model_1": [images["model"][r["j"]] for r in part],
            "ranking_id": [r["ranking_id"] for r in part], "user_id": [r["user_id"] for r in part],
            "num_example_per_prompt": [int(per_prompt[r["prompt"]]) for r in part],
            "__index_level_0__": [r["index"] for r in part],
        }
        path = directory / f"train-{shard:05d}-of-{cfg.n_shards:05d}.parquet"
        pq.write_table(pa.table(columns, schema=pickapic_arrow_schema()), path,
                       row_group_size=math.ceil(len(part) / cfg.row_groups_per_shard))
        paths.append(path)
    return tuple(paths)


def _truth_table(rows: list[dict], images: dict[str, np.ndarray], prompts: dict[str, list],
                 shards: int) -> pa.Table:
    bounds = np.cumsum([len(c) for c in np.array_split(np.arange(len(rows)), shards)])
    columns: dict[str, pa.Array] = {
        "row_number": pa.array([r["row_number"] for r in rows], pa.int64()),
        "shard": pa.array(np.searchsorted(bounds, [r["row_number"] for r in rows], side="right"), pa.int64()),
        "ranking_id": pa.array([r["ranking_id"] for r in rows], pa.int64()),
        "user_id": pa.array([r["user_id"] for r in rows], pa.int64()),
        "annotator_type": pa.array([r["kind"] for r in rows], pa.string()),
        "named_colour": pa.array([prompts["colour"][r["prompt"]] for r in rows], pa.string()),
        "image_0_uid": pa.array([images["uid"][r["i"]] for r in rows], pa.string()),
        "image_1_uid": pa.array([images["uid"][r["j"]] for r in rows], pa.string()),
        "true_label_0": pa.array([r["true"] for r in rows], pa.float64()),
        "chosen_label_0": pa.array([r["chosen"] for r in rows], pa.float64()),
        "given_label_0": pa.array([r["label_0"] for r in rows], pa.float64()),
        "given_label_1": pa.array([r["label_1"] for r in rows], pa.float64()),
        "label_agrees_with_majority": pa.array(
            [None if r["true"] is None or r["chosen"] == 0.5 else r["chosen"] == r["true"] for r in rows], pa.bool_()),
        "planted_defect": pa.array([r["defect"] for r in rows], pa.string()),
        "defect_detail": pa.array([r["detail"] for r in rows], pa.string()),
        "duplicate_of": pa.array([r["duplicate_of"] for r in rows], pa.int64()),
    }
    for prop in ("colour_match", "sharpness", "blur_radius", "exposure", "exposure_quality", "utility"):
        for side, key in (("0", "i"), ("1", "j")):
            columns[f"{prop}_{side}"] = pa.array([float(images[prop][r[key]]) for r in rows], pa.float64())
    return pa.table(columns)
