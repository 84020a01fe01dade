"""Minority / flipped labels in a small world whose true reward is known (issue 7, items 2-4).

Claims tested (methods.md §2.1, §2.7, §3): flipped labels hurt Diffusion-DPO; Adaptive-DPO keeps most of the
clean-data gain at 20-30 % flipped labels; BalancedDPO's scorer-consensus labels improve over DPO.

    python benchmarks/minority.py                   # full run: 23 min on 2 shared cores (+8.5 min pretraining if
                                                    # out/smallworld/base is absent) -> out/minority
    python benchmarks/minority.py --quick           # a few steps at tiny sizes (~1 min): the pipeline, no claims

1. The base model is ``out/smallworld/base`` (built first by ``benchmarks/smallworld/pretrain.py`` if absent).
2. Pairs: training captions x ``pairs_per_caption``, two seeds each, sampled from the base model; true reward
   U of every image from pixels (``smallworld.world.true_reward``).
3. Per flip rate: planted Bradley-Terry labels, a share flipped (``smallworld.pairs.plant_labels``); JSONL with
   base64 PNGs -> ingest -> pixel scorers -> curate -> snapshots plain / adaptive / balanced.
4. LoRA training with ``training.trainer`` per method x flip rate x training seed (``METHODS``).
5. Gain = mean over held-out (caption, seed) of U(fine-tuned) - U(base), same initial noise for both.
   95 % CI: two-level bootstrap, training seeds then held-out captions; per-seed gains listed; differences
   to DPO paired by seed and caption. ``--resummarise`` rebuilds the report of a finished run from results.json.
Writes ``results.json``, ``results.md`` and ``gain_vs_flip.png`` (matplotlib) under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smallworld import pairs as P  # noqa: E402
from benchmarks.smallworld import world  # noqa: E402
from benchmarks.smallworld.pretrain import DEFAULT_OUT as DEFAULT_MODEL  # noqa: E402
from benchmarks.smallworld.pretrain import PretrainConfig, pretrain  # noqa: E402
from benchmarks.smallworld.sampling import load_pipeline, sample, unet_with_lora  # noqa: E402
from training.config import TrainConfig  # noqa: E402
from training.trainer import train  # noqa: E402


# method -> (snapshot policy, TrainConfig fields). One β for every method, so only the data and the loss differ.
METHODS: dict[str, tuple[str, dict]] = {
    "dpo": ("plain", {"loss": "dpo"}),
    "adaptive-offline": ("adaptive", {"loss": "adaptive-dpo", "u_source": "offline"}),
    "adaptive-online": ("adaptive", {"loss": "adaptive-dpo", "u_source": "online"}),
    "adaptive-combined": ("adaptive", {"loss": "adaptive-dpo", "u_source": "max"}),
    "balanced": ("balanced", {"loss": "balanced-dpo"}),  # dynamic reference: hard copy every 100 steps
    "balanced-static": ("balanced", {"loss": "balanced-dpo", "ref_update_every": 0}),  # ablation: fixed reference
}
MAIN_METHODS = ("dpo", "adaptive-offline", "adaptive-online", "adaptive-combined", "balanced")


@dataclass
class ExperimentConfig:
    model: str = str(DEFAULT_MODEL)  # small-world pipeline folder; pretrained here if absent
    out: str = str(Path(__file__).resolve().parents[1] / "out" / "minority")
    flip_rates: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3)  # Adaptive-DPO Tables 1-2 (methods.md §2.7)
    methods: tuple[str, ...] = MAIN_METHODS
    train_seeds: tuple[int, ...] = (0, 1)
    pair_captions: int = 120  # training captions that get pairs
    pairs_per_caption: int = 3
    eval_captions: int = 60  # held-out captions: never in a pair
    eval_seeds: int = 2  # initial noises per held-out caption
    steps: int = 200  # optimiser steps per run
    batch_size: int = 8  # pairs per step
    learning_rate: float = 3e-3  # LoRA at this scale needs far more than SD's 1e-5 (pilot: 1e-3 gained half as much)
    beta: float = 2000.0  # canonical β for every method = Adaptive-DPO's beta_dpo 1000 (pilot: above 5000)
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
    bt_scale: float = 20.0  # P(a wins) = sigmoid(20 ΔU): ΔU = 0.1 -> 0.88
    sample_steps: int = 15  # DDIM steps
    guidance: float = 3.0
    bootstrap: int = 2000
    seed: int = 0
    threads: int = 1  # tiny tensors: one thread is faster than two on 2 shared cores
    pretrain: dict = field(default_factory=dict)  # PretrainConfig overrides when the model must be built

    @classmethod
    def quick(cls, out: str, model: str) -> ExperimentConfig:
        """Every stage at toy size (~1 min): checks the pipeline runs, says nothing about the claims."""
        return cls(model=model, out=out, flip_rates=(0.0, 0.3), train_seeds=(0,), pair_captions=8,
                   pairs_per_caption=1, eval_captions=4, eval_seeds=1, steps=3, batch_size=2, sample_steps=4,
                   bootstrap=100, pretrain={"images": 256, "vae_steps": 10, "unet_steps": 10, "eval_captions": 4})


def ensure_model(c: ExperimentConfig) -> dict:
    """The base model's summary; pretrains it first when the folder holds no pipeline."""
    summary = Path(c.model) / "smallworld.json"
    if not summary.is_file():
        pretrain(PretrainConfig(**{"out": c.model, "threads": c.threads, **c.pretrain}))
    return json.loads(summary.read_text())


def rewards(images: np.ndarray, colours: list[str]) -> dict[str, np.ndarray]:
    props = world.pixel_properties(images, colours)
    return {"reward": world.true_reward(images, colours), **props}


def bootstrap_ci(per_seed_caption: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the mean of (training seeds S, captions C) values, by a two-level bootstrap:
    seeds resampled with replacement, then captions (the same captions for every seed: they are paired)."""
    rng = np.random.default_rng(seed)
    s_count, c_count = per_seed_caption.shape
    seeds = rng.integers(s_count, size=(n, s_count))
    captions = rng.integers(c_count, size=(n, c_count))
    means = per_seed_caption[seeds[:, :, None], captions[:, None, :]].mean(axis=(1, 2))
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


@dataclass
class Pairs:
    ids: list[str]
    captions: list[world.Caption]
    images_a: np.ndarray  # (N, H, W, 3) uint8
    images_b: np.ndarray
    reward_a: np.ndarray  # (N,) true reward
    reward_b: np.ndarray
    annotators: list[str]


def sample_pairs(c: ExperimentConfig, pipe, train_caps: list[world.Caption]) -> Pairs:
    """Caption k, pair j -> the base model's images for seeds (2m, 2m + 1), m = k * pairs_per_caption + j."""
    rng = np.random.default_rng(c.seed)
    chosen = [train_caps[i] for i in rng.choice(len(train_caps), c.pair_captions, replace=False)]
    caps = [cap for cap in chosen for _ in range(c.pairs_per_caption)]
    n = len(caps)
    images = sample(pipe, [cap.text for cap in caps for _ in range(2)], list(range(2 * n)), steps=c.sample_steps,
                    guidance=c.guidance)
    colours = [cap.colour for cap in caps]
    return Pairs([f"pair-{m:05d}" for m in range(n)], caps, images[0::2], images[1::2],
                 rewards(images[0::2], colours)["reward"], rewards(images[1::2], colours)["reward"],
                 [f"annotator-{a:02d}" for a in rng.integers(20, size=n)])


def curate_flip_rate(c: ExperimentConfig, pairs: Pairs, rate: float, work: Path) -> tuple[dict[str, str], dict]:
    """Planted labels at one flip rate -> JSONL -> lake -> curation -> snapshots; (policy -> folder, diagnostics)."""
    label_0, flipped = P.plant_labels(pairs.reward_a, pairs.reward_b, rate, c.bt_scale, seed=c.seed + 17)
    tag = f"flip{round(100 * rate):02d}"
    jsonl = P.write_jsonl(work / tag / "pairs.jsonl", pairs.ids, [cap.text for cap in pairs.captions],
                          pairs.images_a, pairs.images_b, label_0, pairs.annotators)
    policies = tuple(sorted({METHODS[m][0] for m in c.methods}))
    snapshots = P.curate_snapshots(work / tag / "lake", jsonl, policies)
    truth_a = pairs.reward_a > pairs.reward_b
    data = {"label_agrees_with_truth": float(((label_0 == 1.0) == truth_a).mean()), "flipped": int(flipped.sum()),
            **{kind: P.snapshot_truth(path, pairs.ids, truth_a, flipped) for kind, path in snapshots.items()}}
    return snapshots, data


def train_run(c: ExperimentConfig, method: str, snapshot: str, seed: int, output: Path, cache: Path) -> Path:
    """One LoRA fine-tune with ``training.trainer``; returns its final checkpoint folder."""
    config = TrainConfig(snapshot=snapshot, model=c.model, output=str(output), resolution=world.IMAGE_SIZE,
                         train_batch_size=c.batch_size, max_steps=c.steps, learning_rate=c.learning_rate,
                         beta=c.beta, lora_rank=c.lora_rank, lora_target_modules=c.lora_targets, seed=seed,
                         checkpoint_every=10 ** 9, cache_dir=str(cache), **METHODS[method][1])
    return train(config).last_checkpoint


def run(c: ExperimentConfig) -> dict:
    torch.set_num_threads(c.threads)
    started, timings = time.perf_counter(), {}
    out, work = Path(c.out), Path(c.out) / "work"
    base_summary = ensure_model(c)
    timings["model_s"] = time.perf_counter() - started
    train_caps, heldout = world.split_captions(n_heldout=c.eval_captions, seed=c.seed)
    pipe = load_pipeline(c.model)
    base_unet = pipe.unet

    t0 = time.perf_counter()
    pairs = sample_pairs(c, pipe, train_caps)
    timings["pair_sampling_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    snapshots, data = {}, {}
    for rate in c.flip_rates:
        snapshots[rate], data[rate] = curate_flip_rate(c, pairs, rate, work)
    timings["curation_s"] = time.perf_counter() - t0

    # held-out evaluation set: captions never in a pair, seeds disjoint from the pair seeds
    eval_caps = [cap for cap in heldout for _ in range(c.eval_seeds)]
    eval_prompts, eval_colours = [cap.text for cap in eval_caps], [cap.colour for cap in eval_caps]
    eval_seeds = [1_000_000 + i for i in range(len(eval_caps))]
    caption_of = np.repeat(np.arange(len(heldout)), c.eval_seeds)

    def evaluate() -> dict[str, np.ndarray]:
        return rewards(sample(pipe, eval_prompts, eval_seeds, steps=c.sample_steps, guidance=c.guidance),
                       eval_colours)

    base = evaluate()
    runs, t_train, t_eval = [], 0.0, 0.0
    for rate in c.flip_rates:
        for method in c.methods:
            for seed in c.train_seeds:
                name = f"{method}-flip{round(100 * rate):02d}-seed{seed}"
                t0 = time.perf_counter()
                checkpoint = train_run(c, method, snapshots[rate][METHODS[method][0]], seed, work / "runs" / name,
                                       work / "latent_cache")
                t1 = time.perf_counter()
                pipe.unet = unet_with_lora(base_unet, checkpoint, c.lora_rank, float(c.lora_rank), c.lora_targets)
                tuned = evaluate()
                pipe.unet = base_unet
                t_eval, t_train = t_eval + time.perf_counter() - t1, t_train + t1 - t0
                losses = [json.loads(line)["loss"] for line in (work / "runs" / name / "metrics.jsonl").open()]
                runs.append({"method": method, "flip_rate": rate, "seed": seed, "train_s": round(t1 - t0, 2),
                             "loss_last_10_steps": float(np.mean(losses[-10:])),
                             "gain": {k: (tuned[k] - base[k]).tolist() for k in base}})
    timings.update(train_s=t_train, eval_s=t_eval, total_s=time.perf_counter() - started)

    table = summarise(c, runs, caption_of, data)
    result = {"config": asdict(c), "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "base_model": base_summary, "base_eval": {k: float(v.mean()) for k, v in base.items()},
              "pairs": {"n": len(pairs.ids), "true_reward_mean": float(np.r_[pairs.reward_a, pairs.reward_b].mean()),
                        "mean_abs_reward_gap": float(np.abs(pairs.reward_a - pairs.reward_b).mean())},
              "data": {str(k): v for k, v in data.items()}, "table": table, "runs": runs}
    write_report(out, result, c)
    return result


def summarise(c: ExperimentConfig, runs: list[dict], caption_of: np.ndarray, data: dict) -> list[dict]:
    """One row per method x flip rate: seed-averaged gain with a 95 % CI over training seeds and held-out captions
    (``bootstrap_ci``), and the same for the paired difference to DPO at that flip rate (same seeds, captions)."""
    def per_seed_caption(method: str, rate: float) -> np.ndarray:  # (S, C) mean gain of each seed per caption
        mine = sorted((r for r in runs if r["method"] == method and r["flip_rate"] == rate), key=lambda r: r["seed"])
        return np.stack([np.bincount(caption_of, r["gain"]["reward"]) / np.bincount(caption_of) for r in mine])

    rows = []
    for rate in c.flip_rates:
        for method in c.methods:
            mine = [r for r in runs if r["method"] == method and r["flip_rate"] == rate]
            gains = per_seed_caption(method, rate)
            low, high = bootstrap_ci(gains, c.bootstrap, c.seed)
            policy = METHODS[method][0]
            row = {
                "method": method, "flip_rate": rate, "gain": float(gains.mean()), "ci_low": low, "ci_high": high,
                "seed_gains": [float(np.mean(r["gain"]["reward"])) for r in mine],
                **{f"gain_{k}": float(np.mean([np.mean(r["gain"][k]) for r in mine]))
                   for k in ("colour_match", "sharpness", "exposure_quality")},
                "train_labels_truly_better": data[rate][policy]["winner_is_truly_better"],
                "train_pairs": data[rate][policy]["rows"],
            }
            if "dpo" in c.methods:
                diff = gains - per_seed_caption("dpo", rate)
                row["vs_dpo"] = float(diff.mean())
                row["vs_dpo_ci_low"], row["vs_dpo_ci_high"] = bootstrap_ci(diff, c.bootstrap, c.seed)
            rows.append(row)
    clean = {r["method"]: r["gain"] for r in rows if r["flip_rate"] == 0.0}
    for r in rows:
        ref = clean.get("dpo")
        r["share_of_clean_dpo_gain"] = r["gain"] / ref if ref else None
    return rows


def write_report(out: Path, result: dict, c: ExperimentConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(result["table"], c, out / "gain_vs_flip.png")


def resummarise(out: Path) -> dict:
    """Recompute the table, markdown and plot of a finished run from its results.json (no training)."""
    result = json.loads((out / "results.json").read_text())
    c = ExperimentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in result["config"].items()})
    caption_of = np.repeat(np.arange(c.eval_captions), c.eval_seeds)
    data = {float(k): v for k, v in result["data"].items()}
    result["table"] = summarise(c, result["runs"], caption_of, data)
    write_report(out, result, c)
    return result


def markdown(result: dict) -> str:
    c, t = result["config"], result["timings_s"]
    lines = [
        "# Minority-label experiment in the small world", "",
        f"True-reward gain over the base model on {c['eval_captions']} held-out captions x {c['eval_seeds']} seeds "
        f"(paired: same initial noise); mean over training seeds {c['train_seeds']}; 95 % CI = two-level bootstrap "
        f"(training seeds, then held-out captions); 'vs DPO' = paired difference to DPO at the same flip rate. "
        f"Base true reward {result['base_eval']['reward']:.4f}. "
        f"{result['pairs']['n']} pairs, {c['steps']} steps x {c['batch_size']} pairs, lr {c['learning_rate']}, "
        f"β {c['beta']}, LoRA rank {c['lora_rank']}. Runtime {t['total_s']:.0f} s.", "",
        "| flip | method | gain | 95 % CI | per seed | share of clean DPO gain | vs DPO (95 % CI) | Δcolour "
        "| Δsharp | Δexposure | train labels truly better |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["table"]:
        share = "" if r["share_of_clean_dpo_gain"] is None else f"{r['share_of_clean_dpo_gain']:.2f}"
        vs_dpo = ("" if "vs_dpo" not in r or r["method"] == "dpo" else
                  f"{r['vs_dpo']:+.4f} [{r['vs_dpo_ci_low']:+.4f}, {r['vs_dpo_ci_high']:+.4f}]")
        lines.append(
            f"| {r['flip_rate']:.0%} | {r['method']} | {r['gain']:+.4f} "
            f"| [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] "
            f"| {', '.join(f'{g:+.4f}' for g in r['seed_gains'])} | {share} | {vs_dpo} "
            f"| {r['gain_colour_match']:+.4f} | {r['gain_sharpness']:+.4f} | {r['gain_exposure_quality']:+.4f} "
            f"| {r['train_labels_truly_better']:.3f} |")
    lines += ["", "Label quality per flip rate (share of training winners with the higher true reward; AUROC of the "
              "offline minority score u for flipped labels):", "",
              "| flip | human labels | adaptive u AUROC (flipped) | balanced consensus labels |", "|---|---|---|---|"]
    for rate, d in result["data"].items():
        auc = d.get("adaptive", {}).get("auroc_u_flipped")
        lines.append(f"| {float(rate):.0%} | {d['label_agrees_with_truth']:.3f} | "
                     f"{'' if auc is None else f'{auc:.3f}'} | "
                     f"{d['balanced']['winner_is_truly_better'] if 'balanced' in d else float('nan'):.3f} |")
    return "\n".join(lines) + "\n"


def plot(table: list[dict], c: ExperimentConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, method in enumerate(c.methods):
        rows = [r for r in table if r["method"] == method]
        x = np.array([100 * r["flip_rate"] for r in rows]) + (k - len(c.methods) / 2) * 0.6
        y = np.array([r["gain"] for r in rows])
        err = np.array([[r["gain"] - r["ci_low"] for r in rows], [r["ci_high"] - r["gain"] for r in rows]])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("flipped labels (%)")
    ax.set_ylabel("true-reward gain over base")
    ax.set_title("Small world: gain vs label flips (95 % CI: training seeds x held-out captions)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[ExperimentConfig | None, Path | None]:
    """(config to run, None), or (None, output folder) for ``--resummarise``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, a few steps (~1 min)")
    defaults = ExperimentConfig()
    for f in fields(ExperimentConfig):
        if f.name == "pretrain":
            continue
        value = getattr(defaults, f.name)
        kind = type(value[0]) if isinstance(value, tuple) else type(value)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            nargs="+" if isinstance(value, tuple) else None)
    parser.add_argument("--resummarise", action="store_true", help="rebuild the report in --out from results.json")
    args = vars(parser.parse_args(argv))
    quick = args.pop("quick")
    if args.pop("resummarise"):
        return None, Path(args["out"] or defaults.out)
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in args.items() if v is not None}
    if quick:
        out = given.pop("out", str(Path(defaults.out).with_name("minority-quick")))
        model = given.pop("model", str(Path(defaults.model).with_name("base-quick")))
        return ExperimentConfig(**{**asdict(ExperimentConfig.quick(out, model)), **given}), None
    return ExperimentConfig(**given), None


def quiet_libraries() -> None:
    """Hide per-load progress bars and LoRA-loading notices: the run loads dozens of small models."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


if __name__ == "__main__":
    quiet_libraries()
    config, report_only = parse_args(sys.argv[1:])
    print(markdown(resummarise(report_only) if report_only else run(config)))
