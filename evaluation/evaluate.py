"""Model evaluation (docs/methods.md §5): base vs tuned images for the same prompts and seeds, scored by the chosen
scorers, summarised as win rates with confidence intervals, written as eval.json, eval.md and scores.csv.

`run_eval(config)` is the plain function the CLI calls (no Prefect needed). Flows may import both sides:
generation comes from `prefcurate.training.generate`, scoring from `prefcurate.curation.scorers`, the statistics from
`prefcurate.evaluation.winrate`.

"Base" is the model folder with the LoRA bypassed and "tuned" the same weights with the LoRA active, so one copy
of the model is in memory. Without a LoRA, the model is compared with itself: every comparison ties (win rate
0.5), which checks that sampling is deterministic on the machine at hand.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from prefcurate.curation.scorers import Scorer, build_scorer
from prefcurate.evaluation.winrate import CI_METHODS, summarize
from prefcurate.training.generate import LORA_FILE, SamplingConfig, generate, load_pipeline, lora_disabled, use_adapter
from prefcurate.training.prompts import load_prompts


REPORT_FORMAT, REPORT_VERSION = "prefcurate-eval", 1
JOBS_PER_CHUNK = 64  # (prompt, seed) jobs generated and scored together: bounds the images held in memory


@dataclass(frozen=True)
class EvalConfig:
    model: str  # local diffusers pipeline folder
    out: str  # folder for eval.json, eval.md, scores.csv and images/
    lora: str | None = None  # trainer output folder; None compares the model with itself
    against: str | None = None  # a second LoRA folder: compare lora (A) over this one (B) instead of over the base
    prompts: str = "parti"  # parti, imagereward, geneval, or a prompt file (prefcurate.training.prompts)
    limit: int | None = None  # evenly spaced subset of this many prompts
    categories: tuple[str, ...] | None = None  # Parti Category / GenEval tag filter
    scorers: tuple[str, ...] = ("sharpness", "exposure", "colourfulness")  # weight-free defaults
    weights: str | None = None  # folder of scorer checkpoints (prefcurate.curation.scorers table)
    n_seeds: int = 1  # images per prompt per model; docs/methods.md §5.4 uses one
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "cpu"
    dtype: str | None = None  # pipeline dtype; None: fp16 on CUDA, fp32 on the CPU
    ci_method: str = "bootstrap"  # the interval shown; see prefcurate.evaluation.winrate for why bootstrap
    confidence: float = 0.95
    n_bootstrap: int = 2000  # percentile-interval ends are stable to about ±0.005 at 2000 replicates
    bootstrap_seed: int = 0
    save_images: bool = True  # PNGs under out/images/{base,tuned}/ so any score can be looked at

    def __post_init__(self):
        for name in ("n_seeds", "n_bootstrap", "limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie strictly between 0 and 1, got {self.confidence}")
        if not self.scorers:
            raise ValueError("give at least one scorer")
        if self.ci_method not in CI_METHODS:
            raise ValueError(f"unknown ci_method {self.ci_method!r}; valid: {', '.join(CI_METHODS)}")
        if self.against is not None and self.lora is None:
            raise ValueError("--against needs --lora: the LoRA compared with the one given to --against")


@dataclass
class EvalScores:
    prompts: list[str]
    categories: list[str | None]
    seeds: list[int]
    scorers: list[dict]  # name, version, higher_is_better
    base: dict[str, np.ndarray]  # scorer name -> (P, S); the against LoRA's images when one is given
    tuned: dict[str, np.ndarray]
    meta: dict  # prompt set, sampling, model provenance, timings


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def sample_and_score(config: EvalConfig) -> EvalScores:
    """Generate base and tuned images for every (prompt, seed) and score both with every scorer."""
    prompt_set = load_prompts(config.prompts, limit=config.limit,
                              categories=list(config.categories) if config.categories else None)
    scorers: list[Scorer] = [build_scorer(name, config.weights, config.device) for name in config.scorers]
    pipe = load_pipeline(config.model, config.lora, config.device, config.dtype, against_dir=config.against)
    if config.against:  # A vs B: both adapters in one pipeline, the same (prompt, seed) noise for each
        base_side = lambda: use_adapter(pipe, "against")  # noqa: E731
        tuned_side = lambda: use_adapter(pipe, "tuned")  # noqa: E731
    else:  # tuned vs base: the LoRA bypassed, then active
        base_side = lambda: lora_disabled(pipe) if config.lora else contextlib.nullcontext()  # noqa: E731
        tuned_side = contextlib.nullcontext
    seeds = list(range(config.n_seeds))
    jobs = [(p, s) for p in range(len(prompt_set)) for s in seeds]  # prompt-major: a chunk covers whole prompts
    shape = (len(prompt_set), len(seeds))
    base = {sc.name: np.full(shape, np.nan) for sc in scorers}
    tuned = {sc.name: np.full(shape, np.nan) for sc in scorers}
    image_dir = Path(config.out) / "images"
    t0, size = time.perf_counter(), None
    for start in range(0, len(jobs), JOBS_PER_CHUNK):
        chunk = jobs[start:start + JOBS_PER_CHUNK]
        texts, chunk_seeds = [prompt_set.prompts[p] for p, _ in chunk], [s for _, s in chunk]
        with base_side():
            base_images = generate(pipe, texts, chunk_seeds, config.sampling)
        with tuned_side():
            tuned_images = generate(pipe, texts, chunk_seeds, config.sampling)
        size = base_images[0].size
        rows, cols = [p for p, _ in chunk], [s for _, s in chunk]
        for sc in scorers:
            base[sc.name][rows, cols] = sc.score(base_images, texts)
            tuned[sc.name][rows, cols] = sc.score(tuned_images, texts)
        if config.save_images:
            for side, images in (("base", base_images), ("tuned", tuned_images)):
                (image_dir / side).mkdir(parents=True, exist_ok=True)
                for (p, s), image in zip(chunk, images, strict=True):
                    image.save(image_dir / side / f"{p:05d}_seed{s}.png")
    lora_file = Path(config.lora) / LORA_FILE if config.lora else None
    against_file = Path(config.against) / LORA_FILE if config.against else None
    meta = {
        "model": {"path": str(config.model), "pipeline": type(pipe).__name__,
                  "lora": str(config.lora) if config.lora else None,
                  "lora_blake2b": _file_digest(lora_file) if lora_file else None,
                  "against": str(config.against) if config.against else None,
                  "against_blake2b": _file_digest(against_file) if against_file else None},
        "prompts": {"set": prompt_set.name, "file": prompt_set.source, "n": len(prompt_set),
                    "n_in_file": prompt_set.n_in_file, "n_duplicates_dropped": prompt_set.n_duplicates,
                    "limit": config.limit, "categories": list(config.categories) if config.categories else None},
        "sampling": {**asdict(config.sampling), "image_size": list(size), "seeds": seeds,
                     "scheduler": type(pipe.scheduler).__name__, "device": config.device,
                     "dtype": str(pipe.dtype).removeprefix("torch."),
                     "noise": "a CPU torch.Generator per image, seeded with generator_seed(prompt, seed)"},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    scorer_info = [{"name": sc.name, "version": sc.version, "higher_is_better": sc.higher_is_better}
                   for sc in scorers]
    return EvalScores(prompt_set.prompts, prompt_set.categories, seeds, scorer_info, base, tuned, meta)


def summarise(scores: EvalScores, config: EvalConfig) -> dict:
    """The eval.json report: provenance, then one win-rate summary per scorer and their mean."""
    results = []
    for info in scores.scorers:
        stats = summarize(scores.base[info["name"]], scores.tuned[info["name"]],
                          higher_is_better=info["higher_is_better"], confidence=config.confidence,
                          ci_method=config.ci_method, n_bootstrap=config.n_bootstrap,
                          bootstrap_seed=config.bootstrap_seed)
        results.append({"scorer": info["name"], "version": info["version"],
                        "higher_is_better": info["higher_is_better"], **stats.to_dict()})
    return {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        # "base" in scorers, scores.csv and the tables is the side compared against: the base model, or the
        # --against LoRA
        "comparison": "lora over against" if config.against else "tuned over base",
        **scores.meta,
        "statistics": {"ci_method": config.ci_method, "confidence": config.confidence,
                       "n_bootstrap": config.n_bootstrap, "bootstrap_seed": config.bootstrap_seed,
                       "ties": "count 0.5 (exactly equal scores)", "sign_test": "exact binomial over prompts, "
                       "a prompt won/lost when its mean outcome is above/below 0.5"},
        "scorers": results,
        # BalancedDPO's "average win rate": the mean over metrics (docs/methods.md §5.4)
        "average_win_rate": float(np.mean([r["win_rate"] for r in results])),
    }


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-scorer table (shared by eval.md and the CLI)."""
    pct = f"{report['statistics']['confidence']:.0%}"
    header = ["scorer", "win rate", f"{pct} CI ({report['statistics']['ci_method']})", "ties", "mean base",
              "mean tuned", "sign-test p"]
    rows = [[r["scorer"], f"{r['win_rate']:.3f}", f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]",
             f"{r['ties']}/{r['n_comparisons']}", f"{r['mean_base']:.4g}", f"{r['mean_tuned']:.4g}",
             f"{r['sign_test_p']:.3g}"] for r in report["scorers"]]
    return header, rows


def markdown(report: dict) -> str:
    header, rows = table_rows(report)
    against = report["model"].get("against")
    comparison = ("the LoRA over the --against LoRA (columns: base = against, tuned = lora)" if against
                  else "tuned over base")
    lines = [f"# Evaluation: {report['model']['lora'] or 'no LoRA (model against itself)'} over "
             f"{against + ' (both LoRAs on ' + report['model']['path'] + ')' if against else report['model']['path']}",
             "",
             f"{report['prompts']['n']} prompts ({report['prompts']['set']}) × {len(report['sampling']['seeds'])} "
             f"seed(s); {report['sampling']['steps']} steps, guidance {report['sampling']['guidance_scale']}, "
             f"{report['sampling']['image_size'][0]}×{report['sampling']['image_size'][1]} px, "
             f"{report['sampling']['scheduler']}. Win rate of {comparison}; ties count 0.5.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", f"Average win rate over scorers: {report['average_win_rate']:.3f}", "",
              "Scorer versions: " + ", ".join(f"{r['scorer']} `{r['version']}`" for r in report["scorers"])]
    return "\n".join(lines) + "\n"


def write_report(report: dict, scores: EvalScores, out: str) -> dict[str, str]:
    """eval.json, eval.md and scores.csv (one row per prompt, seed and scorer) in `out`."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("eval.json", "eval.md", "scores.csv")}
    paths["eval.json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["eval.md"].write_text(markdown(report))
    with open(paths["scores.csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt_index", "prompt", "category", "seed", "scorer", "base", "tuned"])
        for info in scores.scorers:
            for p, prompt in enumerate(scores.prompts):
                for s, seed in enumerate(scores.seeds):
                    writer.writerow([p, prompt, scores.categories[p] or "", seed, info["name"],
                                     repr(float(scores.base[info["name"]][p, s])),
                                     repr(float(scores.tuned[info["name"]][p, s]))])
    return {k: str(v) for k, v in paths.items()}


def run_eval(config: EvalConfig) -> dict:
    """Sample, score, summarise and write; returns the report (also in config.out/eval.json)."""
    scores = sample_and_score(config)
    report = summarise(scores, config)
    report["files"] = write_report(report, scores, config.out)
    return report
