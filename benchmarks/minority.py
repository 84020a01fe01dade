"""Small world v2: does curation pay off against crowds with structured noise? (issue 11, items 1 and 6)

Claims tested: noisy crowd labels hurt Diffusion-DPO; curated snapshots (Adaptive-DPO weights, BalancedDPO's
scorer consensus, annotator reliability) keep most of the clean-data gain where plain DPO does not.

    python benchmarks/minority.py                   # full run -> out/minority (runtime in results.md)
    python benchmarks/minority.py --quick           # toy sizes, a few steps (~1 min): the pipeline, no claims
    python benchmarks/minority.py --resummarise --out DIR   # rebuild table, markdown and plot from results.json

1. The base model is ``out/smallworld/base`` (built first by ``benchmarks/smallworld/pretrain.py`` if absent).
2. Pairs: training captions x ``pairs_per_caption``, two seeds each, sampled once from the base model; the true
   reward and pixel properties of every image (``smallworld.world``).
3. A crowd (``smallworld.crowd``): Zipf-distributed annotator volume, several labels on some pairs, random
   left/right order; drawn once. Conditions: clean (every annotator reliable), then each scenario (``crowd``:
   spammers, position clickers and a minority-taste group; ``minority``: the minority-taste group only;
   ``flips``: per-label random flips) at each noise level (share of labels not from reliable annotators).
4. Per condition: JSONL with base64 PNGs -> ingest -> pixel scorers -> curate -> one snapshot per policy.
   From the same lake: annotator-type detection AUROC (Dawid-Skene reliability of the annotators table,
   non-reliable vs reliable annotators with >= ``min_annotator_labels`` labels) and every policy's weighted
   share of truly better winners.
5. LoRA training with ``training.trainer`` per method x condition x training seed (``METHODS``). Paired design
   (common random numbers): every method of a condition trains from the same seeds and is evaluated on the same
   held-out (caption, initial noise); the crowd's draws are shared by every condition.
6. Gain = mean over held-out (caption, seed) of U(fine-tuned) - U(base). 95 % CI: two-level bootstrap,
   training seeds then held-out captions; differences to DPO paired by seed and caption.
Writes ``results.json`` (config, truth, every run's per-image gains), ``results.md`` and ``gain_vs_noise.png``.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.smallworld import crowd as C  # noqa: E402
from benchmarks.smallworld import pairs as P  # noqa: E402
from benchmarks.smallworld import world  # noqa: E402
from benchmarks.smallworld.pretrain import DEFAULT_OUT as DEFAULT_MODEL  # noqa: E402
from benchmarks.smallworld.pretrain import PretrainConfig, pretrain  # noqa: E402
from benchmarks.smallworld.sampling import load_pipeline, sample, unet_with_lora  # noqa: E402
from prefcurate.training.config import TrainConfig  # noqa: E402
from prefcurate.training.trainer import train  # noqa: E402


# snapshot -> SnapshotPolicy fields (beyond pairs_per_shard); every snapshot is written for every condition, so the
# weighted share of truly better winners is reported for each. filter's min_reliability comes from the config.
SNAPSHOTS: dict[str, dict] = {
    "plain": {"kind": "plain"},
    "filter": {"kind": "filter"},  # plain minus suspect pairs (u > 1/2) and unreliable annotators
    "adaptive": {"kind": "adaptive"},  # offline Adaptive-DPO weight W, margin Γ and minority score u
    "balanced": {"kind": "balanced"},  # BalancedDPO: equal-vote scorer majority (the paper baseline)
    "calibrated": {"kind": "balanced", "consensus": "calibrated"},  # scorer votes weighted by their reliability
    "reliability": {"kind": "reliability"},  # the posterior that the label is right as the weight, p < 1/2 dropped
}

# method -> (snapshot, TrainConfig fields). One β for every method, so only the data and the loss differ.
METHODS: dict[str, tuple[str, dict]] = {
    "dpo": ("plain", {"loss": "dpo"}),
    "filter": ("filter", {"loss": "dpo"}),
    "adaptive-offline": ("adaptive", {"loss": "adaptive-dpo", "u_source": "offline"}),
    "adaptive-online": ("adaptive", {"loss": "adaptive-dpo", "u_source": "online"}),
    "adaptive-combined": ("adaptive", {"loss": "adaptive-dpo", "u_source": "max"}),
    # BalancedDPO in the paper's form: the scorers' consensus label, a static reference model
    "balanced": ("balanced", {"loss": "balanced-dpo", "ref_update_every": 0}),
    "balanced-dynamic": ("balanced", {"loss": "balanced-dpo"}),  # ablation: hard copy of the policy every 100 steps
    "calibrated": ("calibrated", {"loss": "balanced-dpo", "ref_update_every": 0}),
    "reliability": ("reliability", {"loss": "dpo"}),  # DPO reads the snapshot's weights
    # the combination: pairs the posterior trusts, and the online Adaptive-DPO weight on what remains
    "reliability+online": ("reliability", {"loss": "adaptive-dpo", "u_source": "online"}),
}
MAIN_METHODS = tuple(m for m in METHODS if m != "balanced-dynamic")
CLEAN = ("clean", 0.0)


@dataclass
class ExperimentConfig:
    model: str = str(DEFAULT_MODEL)  # small-world pipeline folder; pretrained here if absent
    out: str = str(Path(__file__).resolve().parents[1] / "out" / "minority")
    scenarios: tuple[str, ...] = ("crowd", "minority", "flips")  # keys of smallworld.crowd.SCENARIOS
    noise_levels: tuple[float, ...] = (0.2, 0.4)  # share of labels not from reliable annotators; 0 = "clean"
    methods: tuple[str, ...] = MAIN_METHODS
    train_seeds: tuple[int, ...] = (0, 1)  # every method x condition
    # pre-registered headline comparison, on more seeds: plain DPO against the `reliability` policy where the claims
    # of issue 11 are judged (clean, and 40 % planted annotators); chosen before any result, so no selection bias
    headline_methods: tuple[str, ...] = ("dpo", "reliability")
    headline_conditions: tuple[str, ...] = ("clean00", "crowd40", "minority40")
    headline_seeds: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9)
    pair_captions: int = 200  # training captions that get pairs
    pairs_per_caption: int = 3
    n_annotators: int = 40  # with Zipf 0.8 and ~2 labels a pair: ~18 annotators with >= 20 labels
    zipf_exponent: float = 0.8
    multi_label_share: float = 0.5  # pairs with 2-4 labels from distinct annotators
    max_labels_per_pair: int = 4
    min_annotator_labels: int = 20  # annotators counted in the detection AUROC
    # filter policy: drop annotators below this reliability (leave-one-out balanced accuracy for the majority's taste:
    # 1/2 for a spammer, a pure position clicker or a minority taste, 0.63-0.86 for a Bradley-Terry annotator of the
    # clean small world; 0.44-0.59 for everyone at 40 % flips, where 0.65 kept no pair); 0 = keep all
    filter_min_reliability: float = 0.55
    eval_captions: int = 60  # held-out captions: never in a pair
    eval_seeds: int = 2  # initial noises per held-out caption
    steps: int = 80  # optimiser steps per run: 1,280 label rows, ~1 epoch. Pilot (3 seeds): clean DPO gain
    #                  0.025 +- 0.004 here, against 0.009 +- 0.008 at 32 x 40 and 0.019 +- 0.013 at v2's 8 x 120
    batch_size: int = 16  # label rows per step
    learning_rate: float = 3e-3  # LoRA at this scale needs far more than SD's 1e-5 (v1 pilot: 1e-3 gained half)
    beta: float = 2000.0  # canonical β for every method = Adaptive-DPO's beta_dpo 1000 (v1 pilot: above 5000)
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
    bt_scale: float = 20.0  # reliable annotators: P(a wins) = sigmoid(20 ΔU): ΔU = 0.1 -> 0.88
    sample_steps: int = 10  # DDIM steps (v1: 15), for the pairs and the evaluation
    guidance: float = 3.0
    bootstrap: int = 2000
    seed: int = 0
    threads: int = 1  # tiny tensors: one thread is faster than two on 2 shared cores
    workers: int = 1  # processes, each with its own conditions (`--only`), merged at the end; 2 on a 2-core machine
    curate_only: bool = False  # stop after curation: print each condition's label quality and detection (no training)
    only: tuple[str, ...] = ()  # condition tags (e.g. minority40) to curate and train; empty = all. Splits a run
    #                             across processes; ``--resummarise --merge`` joins their results.json
    pretrain: dict = field(default_factory=dict)  # PretrainConfig overrides when the model must be built

    @classmethod
    def quick(cls, out: str, model: str) -> ExperimentConfig:
        """Every stage at toy size (~1 min): checks the pipeline runs, says nothing about the claims."""
        return cls(model=model, out=out, scenarios=("crowd",), noise_levels=(0.4,), train_seeds=(0,),
                   pair_captions=12, pairs_per_caption=2, n_annotators=6, zipf_exponent=0.5, min_annotator_labels=3,
                   filter_min_reliability=0.0,
                   eval_captions=4, eval_seeds=1, steps=2, batch_size=2, sample_steps=3, bootstrap=100,
                   headline_conditions=("clean00", "crowd40"), headline_seeds=(1,),
                   pretrain={"images": 256, "vae_steps": 10, "unet_steps": 10, "eval_captions": 4})

    def conditions(self, all_of_them: bool = False) -> list[tuple[str, float]]:
        every = [CLEAN] + [(s, t) for s in self.scenarios for t in self.noise_levels]
        return every if all_of_them or not self.only else [k for k in every if tag(k) in self.only]

    def schedule(self) -> list[tuple[int, tuple[str, float], str]]:
        """(training seed, condition, method) of every run, in order: every method on ``train_seeds`` (seed-major:
        a stopped run keeps whole seeds), then the headline methods on the headline conditions' extra seeds."""
        full = [(s, k, m) for s in self.train_seeds for k in self.conditions() for m in self.methods]
        extra = [(s, k, m) for s in self.headline_seeds if s not in self.train_seeds for k in self.conditions()
                 if tag(k) in self.headline_conditions for m in self.headline_methods if m in self.methods]
        return full + extra

    def crowd_config(self) -> C.CrowdConfig:
        return C.CrowdConfig(n_annotators=self.n_annotators, zipf_exponent=self.zipf_exponent,
                             multi_label_share=self.multi_label_share, max_labels_per_pair=self.max_labels_per_pair,
                             reliable=C.Reliable(self.bt_scale), seed=self.seed + 17)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.scenarios) - set(C.SCENARIOS))
        if unknown:
            raise ValueError(f"unknown method(s)/scenario(s) {unknown}; methods: {', '.join(METHODS)}; "
                             f"scenarios: {', '.join(C.SCENARIOS)}")


def tag(condition: tuple[str, float]) -> str:
    return f"{condition[0]}{round(100 * condition[1]):02d}"


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
    captions: list[world.Caption]
    images_a: np.ndarray  # (N, H, W, 3) uint8
    images_b: np.ndarray
    props_a: dict[str, np.ndarray]  # reward and pixel properties, each (N,)
    props_b: dict[str, np.ndarray]


def sample_pairs(c: ExperimentConfig, pipe, train_caps: list[world.Caption]) -> Pairs:
    """Caption k, pair j -> the base model's images for seeds (2m, 2m + 1), m = k * pairs_per_caption + j."""
    rng = np.random.default_rng(c.seed)
    chosen = [train_caps[i] for i in rng.choice(len(train_caps), c.pair_captions, replace=False)]
    caps = [cap for cap in chosen for _ in range(c.pairs_per_caption)]
    images = sample(pipe, [cap.text for cap in caps for _ in range(2)], list(range(2 * len(caps))),
                    steps=c.sample_steps, guidance=c.guidance)
    colours = [cap.colour for cap in caps]
    return Pairs(caps, images[0::2], images[1::2], rewards(images[0::2], colours), rewards(images[1::2], colours))


def label_ids(n: int) -> list[str]:
    return [f"label-{r:05d}" for r in range(n)]


def curate_condition(c: ExperimentConfig, pairs: Pairs, crowd: C.Crowd, labels: C.Labels, condition, work: Path,
                     snapshot_names: tuple[str, ...]) -> tuple[dict[str, str], dict]:
    """One condition's labels -> JSONL -> lake -> curation -> snapshots; (policy -> folder, diagnostics)."""
    left_a = labels.left_is_a
    idx = crowd.pair
    left = np.where(left_a[:, None, None, None], pairs.images_a[idx], pairs.images_b[idx])
    right = np.where(left_a[:, None, None, None], pairs.images_b[idx], pairs.images_a[idx])
    ids = label_ids(crowd.n_labels)
    folder = work / tag(condition)
    jsonl = P.write_jsonl(folder / "pairs.jsonl", ids, [pairs.captions[m].text for m in idx], left, right,
                          labels.label_left, [C.user_id(j) for j in crowd.annotator])
    policies = {name: {**SNAPSHOTS[name], **({"min_reliability": c.filter_min_reliability or None}
                                             if name == "filter" else {})} for name in snapshot_names}
    snapshots = P.curate_snapshots(folder / "lake", jsonl, policies)
    a_better = pairs.props_a["reward"] > pairs.props_b["reward"]
    left_better = np.where(left_a, a_better[idx], ~a_better[idx])  # (L,) the left image has the higher true U
    kinds = np.array(labels.annotator_kind)[crowd.annotator]
    data = {
        "labels": crowd.n_labels, "noisy_label_share": float(labels.noisy.mean()),
        "label_agrees_with_truth": float(((labels.label_left == 1.0) == left_better).mean()),
        "label_agrees_with_truth_by_kind": {k: float(((labels.label_left == 1.0) == left_better)[kinds == k].mean())
                                            for k in sorted(set(kinds))},
        "snapshots": {kind: P.snapshot_truth(path, ids, left_better, labels.noisy)
                      for kind, path in snapshots.items()},
        "annotator_detection": P.annotator_detection(folder / "lake", labels.annotator_kind, c.min_annotator_labels),
        "truth": labels.truth(crowd),
    }
    return snapshots, data


def train_run(c: ExperimentConfig, method: str, snapshot: str, seed: int, output: Path, cache: Path) -> Path:
    """One LoRA fine-tune with ``prefcurate.training.trainer``; returns its final checkpoint folder."""
    config = TrainConfig(snapshot=snapshot, model=c.model, output=str(output), resolution=world.IMAGE_SIZE,
                         train_batch_size=c.batch_size, max_steps=c.steps, learning_rate=c.learning_rate,
                         beta=c.beta, lora_rank=c.lora_rank, lora_target_modules=c.lora_targets, seed=seed,
                         checkpoint_every=10 ** 9, cache_dir=str(cache), **METHODS[method][1])
    return train(config).last_checkpoint


def training_digest(snapshot: str, method: str) -> str:
    """sha256 of what ``method``'s training reads from a snapshot (its rows' meta columns and image bytes, in
    order): two conditions whose snapshots train alike (BalancedDPO's scorer-only labels ignore the crowd) share
    one run. The offline minority score counts only for Adaptive-DPO with an offline u (the trainer's only use)."""
    train = METHODS[method][1]
    offline_u = train["loss"] == "adaptive-dpo" and train.get("u_source") != "online"
    return _columns_digest(snapshot, frozenset({"pair_id"} | (set() if offline_u else {"minority_score"})))


@functools.lru_cache(maxsize=None)
def _columns_digest(snapshot: str, skip: frozenset[str]) -> str:
    """sha256 of a snapshot's trainer-read columns except ``skip``; cached: methods sharing a snapshot read it once."""
    import pyarrow.parquet as pq
    from prefcurate.training.snapshot_reader import IMAGE_COLUMNS, META_COLUMNS, OPTIONAL_COLUMNS

    digest = hashlib.sha256()
    for shard in sorted(Path(snapshot, "shards").glob("*.parquet")):
        table = pq.read_table(shard)
        for name in (*META_COLUMNS, *OPTIONAL_COLUMNS, *IMAGE_COLUMNS):
            if name in table.column_names and name not in skip:
                digest.update(name.encode())
                digest.update(repr(table.column(name).to_pylist()).encode())
    return digest.hexdigest()


def run_workers(c: ExperimentConfig, argv: list[str]) -> dict:
    """``c.workers`` processes, each running ``argv`` on its share of the conditions (``--only``), then one merged
    report in ``c.out`` (``resummarise``). Conditions are dealt so that the workers' numbers of runs are even."""
    runs_of = {tag(k): 0 for k in c.conditions()}
    for _, condition, _ in c.schedule():
        runs_of[tag(condition)] += 1
    loads, groups = [0] * c.workers, [[] for _ in range(c.workers)]
    for name in sorted(runs_of, key=lambda n: -runs_of[n]):  # greedy: the costliest condition to the idlest worker
        k = loads.index(min(loads))
        groups[k].append(name)
        loads[k] += runs_of[name]
    groups = [g for g in groups if g]
    started, out = time.perf_counter(), Path(c.out)
    parts = [out / f"part-{k}" for k in range(len(groups))]
    procs = []
    for group, part in zip(groups, parts, strict=True):
        part.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, *argv, "--workers", "1", "--out", str(part), "--only", *group]
        procs.append(subprocess.Popen(cmd, stdout=(part / "stdout.md").open("w"), stderr=(part / "log.txt").open("w")))
    failed = [str(part) for proc, part in zip(procs, parts, strict=True) if proc.wait() != 0]
    if failed:
        raise RuntimeError(f"worker(s) failed, see their log.txt: {', '.join(failed)}")
    merged = json.loads((parts[0] / "results.json").read_text())
    merged["timings_s"]["total_s"] = round(time.perf_counter() - started, 1)
    merged["timings_s"]["workers"] = len(parts)
    merged["config"]["workers"] = c.workers
    merged["timings_s"]["worker_totals_s"] = [json.loads((p / "results.json").read_text())["timings_s"]["total_s"]
                                              for p in parts]
    merged["load_average"] = list(os.getloadavg())
    write_report(out, merged)
    return resummarise(out, tuple(parts[1:]))


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
    crowd = C.draw_crowd(len(pairs.captions), c.crowd_config())
    timings["pair_sampling_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    policies = tuple(SNAPSHOTS)
    clean = C.plant_crowd_labels(crowd, pairs.props_a, pairs.props_b, C.SCENARIOS["flips"], 0.0)
    snapshots, data = {}, {}
    if CLEAN in c.conditions():
        snapshots[CLEAN], data[CLEAN] = curate_condition(c, pairs, crowd, clean, CLEAN, work, policies)
    for name in c.scenarios:
        scenario = C.SCENARIOS[name]
        noisy = C.non_reliable_annotators(crowd, scenario, c.noise_levels) if not scenario.flips else {}
        for level in c.noise_levels:
            if (name, level) not in c.conditions():
                continue
            labels = C.plant_crowd_labels(crowd, pairs.props_a, pairs.props_b, scenario, level, noisy.get(level))
            snapshots[(name, level)], data[(name, level)] = curate_condition(
                c, pairs, crowd, labels, (name, level), work, policies)
    timings["curation_s"] = time.perf_counter() - t0
    print(f"[{time.perf_counter() - started:7.0f} s] {len(pairs.captions)} pairs, {crowd.n_labels} labels, "
          f"{len(data)} conditions curated", file=sys.stderr, flush=True)

    if c.curate_only:
        return {"config": asdict(c), "data": {tag(k): v for k, v in data.items()},
                "timings_s": {k: round(v, 1) for k, v in timings.items()}}

    # held-out evaluation set: captions never in a pair, seeds disjoint from the pair seeds
    eval_caps = [cap for cap in heldout for _ in range(c.eval_seeds)]
    eval_prompts, eval_colours = [cap.text for cap in eval_caps], [cap.colour for cap in eval_caps]
    eval_seeds = [1_000_000 + i for i in range(len(eval_caps))]

    def evaluate() -> dict[str, np.ndarray]:
        return rewards(sample(pipe, eval_prompts, eval_seeds, steps=c.sample_steps, guidance=c.guidance),
                       eval_colours)

    base = evaluate()
    runs, t_train, t_eval = [], 0.0, 0.0
    digests = {k: {m: training_digest(v[METHODS[m][0]], m) for m in c.methods} for k, v in snapshots.items()}
    done: dict[tuple, dict] = {}  # (training digest, method, seed) -> the run that trained it
    plan = c.schedule()
    for i, (seed, condition, method) in enumerate(plan):
        name = f"{method}-{tag(condition)}-seed{seed}"
        key = (digests[condition][method], method, seed)
        if key in done:  # the same training data, method and seed as a finished run: its result holds
            runs.append({**done[key], "run": name, "scenario": condition[0], "noise": condition[1],
                         "reused_from": done[key]["run"], "train_s": 0.0})
        else:
            t0 = time.perf_counter()
            checkpoint = train_run(c, method, snapshots[condition][METHODS[method][0]], seed,
                                   work / "runs" / name, work / "latent_cache")
            t1 = time.perf_counter()
            pipe.unet = unet_with_lora(base_unet, checkpoint, c.lora_rank, float(c.lora_rank), c.lora_targets)
            tuned = evaluate()
            pipe.unet = base_unet
            t_eval, t_train = t_eval + time.perf_counter() - t1, t_train + t1 - t0
            losses = [json.loads(line)["loss"] for line in (work / "runs" / name / "metrics.jsonl").open()]
            print(f"[{time.perf_counter() - started:7.0f} s] {name}: train {t1 - t0:.0f} s, eval "
                  f"{time.perf_counter() - t1:.0f} s, gain {float(np.mean(tuned['reward'] - base['reward'])):+.4f}",
                  file=sys.stderr, flush=True)
            runs.append({"run": name, "method": method, "scenario": condition[0], "noise": condition[1], "seed": seed,
                         "train_s": round(t1 - t0, 2), "loss_last_10_steps": float(np.mean(losses[-10:])),
                         "gain": {k: np.round(tuned[k] - base[k], 6).tolist() for k in base}})
            done[key] = runs[-1]
        if i + 1 == len(plan) or plan[i + 1][:2] != (seed, condition):
            progress = {"runs_done": len(runs), "runs_planned": len(plan)}
            timings.update(train_s=t_train, eval_s=t_eval, total_s=time.perf_counter() - started)
            result = assemble(c, runs, data, base, base_summary, pairs, crowd, timings, progress)
            write_report(out, result)  # after every block: a stopped run leaves what it finished summarised
    return result


def assemble(c, runs, data, base, base_summary, pairs, crowd, timings, partial) -> dict:
    result = {"config": asdict(c), "timings_s": {k: round(v, 1) for k, v in timings.items()},
              "load_average": list(os.getloadavg()), "cpu_count": os.cpu_count(), "progress": partial,
              "base_model": base_summary, "base_eval": {k: float(v.mean()) for k, v in base.items()},
              "pairs": {"n": len(pairs.captions), "labels": crowd.n_labels,
                        "true_reward_mean": float(np.r_[pairs.props_a["reward"], pairs.props_b["reward"]].mean()),
                        "mean_abs_reward_gap": float(np.abs(pairs.props_a["reward"] - pairs.props_b["reward"]).mean())},
              "data": {tag(k): {"scenario": k[0], "noise": k[1], **v} for k, v in data.items()}, "runs": runs}
    result["table"] = summarise(c, runs)
    result["verdicts"] = verdicts(c, runs, result["data"], result["table"])
    return result


def complete_blocks(c: ExperimentConfig, runs: list[dict]) -> list[dict]:
    """The runs of the (condition, training seed) blocks in which every method planned for the block finished
    (``ExperimentConfig.schedule``: all methods on ``train_seeds``, the headline methods on the headline seeds):
    methods are compared on the same seeds only; a stopped run's last block stays in results.json, unused."""
    planned: dict[tuple, set] = {}
    for seed, condition, method in replace(c, only=()).schedule():
        planned.setdefault((*condition, seed), set()).add(method)
    done: dict[tuple, set] = {}
    for r in runs:
        done.setdefault((r["scenario"], r["noise"], r["seed"]), set()).add(r["method"])
    return [r for r in runs if done[(r["scenario"], r["noise"], r["seed"])] >= planned.get(
        (r["scenario"], r["noise"], r["seed"]), set(c.methods))]


def summarise(c: ExperimentConfig, runs: list[dict]) -> list[dict]:
    """One row per method x condition (with at least one finished seed): seed-averaged gain with a 95 % CI over
    training seeds and held-out captions (``bootstrap_ci``), and the same for the paired difference to DPO in that
    condition (same seeds, captions); share of the clean-DPO gain. Complete (condition, seed) blocks only."""
    caption_of = np.repeat(np.arange(c.eval_captions), c.eval_seeds)
    runs = complete_blocks(c, runs)

    def mine(method: str, condition) -> list[dict]:
        return sorted((r for r in runs if r["method"] == method and (r["scenario"], r["noise"]) == tuple(condition)),
                      key=lambda r: r["seed"])

    def per_seed_caption(rs: list[dict]) -> np.ndarray:  # (S, C) mean gain of each seed per caption
        return np.stack([np.bincount(caption_of, r["gain"]["reward"]) / np.bincount(caption_of) for r in rs])

    rows = []
    for condition in c.conditions():
        dpo = {r["seed"]: r for r in mine("dpo", condition)}
        for method in c.methods:
            rs = mine(method, condition)
            if not rs:
                continue
            gains = per_seed_caption(rs)
            low, high = bootstrap_ci(gains, c.bootstrap, c.seed)
            row = {"method": method, "scenario": condition[0], "noise": condition[1], "snapshot": METHODS[method][0],
                   "seeds": [r["seed"] for r in rs], "gain": float(gains.mean()), "ci_low": low, "ci_high": high,
                   "seed_gains": [float(np.mean(r["gain"]["reward"])) for r in rs],
                   **{f"gain_{k}": float(np.mean([np.mean(r["gain"][k]) for r in rs]))
                      for k in ("colour_match", "sharpness", "exposure_quality")}}
            paired = [r for r in rs if r["seed"] in dpo]
            if paired:
                diff = per_seed_caption(paired) - per_seed_caption([dpo[r["seed"]] for r in paired])
                row["vs_dpo"] = float(diff.mean())
                row["vs_dpo_ci_low"], row["vs_dpo_ci_high"] = bootstrap_ci(diff, c.bootstrap, c.seed)
            rows.append(row)
    clean_dpo = next((r["gain"] for r in rows if r["method"] == "dpo" and (r["scenario"], r["noise"]) == CLEAN), None)
    for r in rows:
        r["share_of_clean_dpo_gain"] = r["gain"] / clean_dpo if clean_dpo else None
    return rows


def bootstrap_ratio_ci(num: np.ndarray, den: np.ndarray, n: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of mean(num) / mean(den) for two (S, C) arrays paired by training seed and caption,
    resampled together (``bootstrap_ci``'s two levels)."""
    rng = np.random.default_rng(seed)
    s_count, c_count = num.shape
    seeds = rng.integers(s_count, size=(n, s_count))[:, :, None]
    captions = rng.integers(c_count, size=(n, c_count))[:, None, :]
    ratios = num[seeds, captions].mean(axis=(1, 2)) / den[seeds, captions].mean(axis=(1, 2))
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def verdicts(c: ExperimentConfig, runs: list[dict], data: dict, table: list[dict]) -> list[dict]:
    """The claims of issue 11, each with its number, interval and verdict (holds / does not hold / not resolved:
    the 95 % interval straddles the threshold). Complete (condition, seed) blocks only."""
    caption_of = np.repeat(np.arange(c.eval_captions), c.eval_seeds)
    runs = complete_blocks(c, runs)

    def gains(method: str, condition) -> dict[int, np.ndarray]:  # seed -> (C,) mean gain per caption
        return {r["seed"]: np.bincount(caption_of, r["gain"]["reward"]) / np.bincount(caption_of) for r in runs
                if r["method"] == method and (r["scenario"], r["noise"]) == tuple(condition)}

    def judge(low: float, high: float, threshold: float, above: bool = True) -> str:
        if (low > threshold) if above else (high < threshold):
            return "holds"
        if (high < threshold) if above else (low > threshold):
            return "does not hold"
        return "not resolved"

    out = []
    clean = gains("dpo", CLEAN)
    for condition in [k for k in c.conditions() if k != CLEAN]:
        label = f"{condition[0]} {condition[1]:.0%}"
        dpo = gains("dpo", condition)
        seeds = sorted(set(dpo) & set(clean))
        if not seeds:
            continue
        den = np.stack([clean[s] for s in seeds])
        share = float(np.stack([dpo[s] for s in seeds]).mean() / den.mean())
        low, high = bootstrap_ratio_ci(np.stack([dpo[s] for s in seeds]), den, c.bootstrap, c.seed)
        out.append({"claim": "plain DPO keeps < 50 % of the clean-DPO gain", "condition": label, "value": share,
                    "ci": [low, high], "verdict": judge(low, high, 0.5, above=False)})
        for method in [m for m in c.headline_methods if m != "dpo"] if tag(condition) in c.headline_conditions else []:
            mine = gains(method, condition)
            both = [s for s in seeds if s in mine]
            if both:
                num, den = np.stack([mine[s] for s in both]), np.stack([clean[s] for s in both])
                low, high = bootstrap_ratio_ci(num, den, c.bootstrap, c.seed)
                out.append({"claim": f"{method} (pre-registered headline, {len(both)} seeds) keeps >= 80 % of the "
                                     f"clean-DPO gain", "condition": label, "value": float(num.mean() / den.mean()),
                            "ci": [low, high], "verdict": judge(low, high, 0.8)})
        common = [s for s in seeds if s in c.train_seeds]  # every method ran these: a like-for-like choice
        rivals = {m: g for m in c.methods if m != "dpo" and set(common) <= set(g := gains(m, condition))}
        if common and rivals:
            best = max(rivals, key=lambda m: np.mean([rivals[m][s].mean() for s in common]))
            num, den = np.stack([rivals[best][s] for s in common]), np.stack([clean[s] for s in common])
            low, high = bootstrap_ratio_ci(num, den, c.bootstrap, c.seed)
            out.append({"claim": f"the best curated method ({best}; chosen on this same data) keeps "
                                 f">= 80 % of the clean-DPO gain", "condition": label,
                        "value": float(num.mean() / den.mean()), "ci": [low, high], "verdict": judge(low, high, 0.8)})
        for r in table:
            if (r["scenario"], r["noise"]) == condition and r["method"] != "dpo" and "vs_dpo" in r:
                out.append({"claim": f"{r['method']} beats DPO", "condition": label, "value": r["vs_dpo"],
                            "ci": [r["vs_dpo_ci_low"], r["vs_dpo_ci_high"]],
                            "verdict": judge(r["vs_dpo_ci_low"], r["vs_dpo_ci_high"], 0.0)})
    for key, d in data.items():
        det = d["annotator_detection"]
        if det.get("auroc") is not None:
            out.append({"claim": "annotator-type detection AUROC >= 0.95", "condition": key, "value": det["auroc"],
                        "ci": None, "verdict": "holds" if det["auroc"] >= 0.95 else "does not hold"})
        snaps = d["snapshots"]
        if {"reliability", "adaptive", "filter"} <= set(snaps) and d["noise"] > 0:
            mine = snaps["reliability"]["weighted_truly_better"]
            rivals = max(snaps["adaptive"]["weighted_truly_better"], snaps["filter"]["weighted_truly_better"])
            out.append({"claim": "reliability's weighted share of truly better winners beats adaptive and filter",
                        "condition": key, "value": mine - rivals, "ci": None,
                        "verdict": "holds" if mine > rivals else "does not hold"})
    return out


def write_report(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("results.json", json.dumps(result, indent=1)), ("results.md", markdown(result))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)  # atomic: a reader never sees half a report
    plot(result, out / "gain_vs_noise.png")


def config_from_dict(d: dict) -> ExperimentConfig:
    return ExperimentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _load(out: Path) -> dict:
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the experiment first")
    result = json.loads(path.read_text())
    if "runs" not in result:
        raise ValueError(f"{path} keeps no per-run data (written before small world v2): rerun the experiment")
    return result


def resummarise(out: Path, merge: tuple[Path, ...] = ()) -> dict:
    """Recompute the table, markdown and plot of a run from its results.json (no training). ``merge``: folders of
    runs of the same experiment split with ``--only`` (same pairs, crowd and evaluation set); their runs and
    conditions join this one's, which must not hold the same (method, condition, seed) already."""
    result = _load(out)
    others_config = []
    for folder in merge:
        other = _load(folder)
        others_config.append(other["config"])
        keys = {(r["method"], r["scenario"], r["noise"], r["seed"]) for r in result["runs"]}
        same = {k: result["config"][k] for k in ("seed", "pair_captions", "pairs_per_caption", "n_annotators",
                                                  "eval_captions", "eval_seeds", "steps", "sample_steps")}
        if {k: other["config"][k] for k in same} != same or other["base_eval"] != result["base_eval"]:
            raise ValueError(f"{folder}: not the same experiment (settings or base evaluation differ)")
        twice = keys & {(r["method"], r["scenario"], r["noise"], r["seed"]) for r in other["runs"]}
        if twice:
            raise ValueError(f"{folder}: {len(twice)} runs are in both results, e.g. {sorted(twice)[0]}")
        result["runs"] += other["runs"]
        result["data"] = {**other["data"], **result["data"]}
        result["merged_from"] = [*result.get("merged_from", []), str(folder)]
    first_config = dict(result["config"])
    c = config_from_dict({**result["config"], "only": ()})
    result["config"]["only"] = []
    if merge:  # what every merged run planned, each with its own conditions (``only``)
        plans = {(s, tag(k), m) for r in [first_config, *others_config]
                 for s, k, m in config_from_dict(r).schedule()}
        result["progress"] = {"runs_done": len(result["runs"]), "runs_planned": len(plans)}
    order = [tag(k) for k in c.conditions()]
    result["data"] = {k: result["data"][k] for k in sorted(result["data"], key=lambda k: order.index(k)
                                                           if k in order else len(order))}
    result["table"] = summarise(c, result["runs"])
    result["verdicts"] = verdicts(c, result["runs"], result["data"], result["table"])
    write_report(out, result)
    return result


def markdown(result: dict) -> str:
    c, t = result["config"], result["timings_s"]
    progress = result["progress"]
    used = complete_blocks(config_from_dict(c), result["runs"])
    done = sorted({r["seed"] for r in used})
    partial = ("" if progress["runs_done"] == progress["runs_planned"] else (
        f"**PARTIAL: {progress['runs_done']} of {progress['runs_planned']} runs finished (training seeds "
        f"{c['train_seeds']} planned); the table uses the {len(used)} runs of (condition, seed) blocks that every "
        f"method finished.** ")) + (f"Merged from {len(result['merged_from']) + 1} runs of the same experiment "
                                   f"(`merged_from`); the runtime is the first one's. " if result.get("merged_from") else "")
    lines = [
        "# Small world v2: structured crowd noise", "",
        partial + f"True-reward gain over the base model on {c['eval_captions']} held-out captions x "
        f"{c['eval_seeds']} seeds (paired: same initial noise); mean over training seeds {list(done)}; 95 % CI = "
        f"two-level bootstrap (training seeds, then held-out captions); 'vs DPO' = paired difference to DPO in the "
        f"same condition (same seeds and captions); per seed: the seeds of that row. Base true reward {result['base_eval']['reward']:.4f}. "
        f"{result['pairs']['n']} pairs, {result['pairs']['labels']} labels from {c['n_annotators']} annotators; "
        f"{c['steps']} steps x {c['batch_size']} labels, lr {c['learning_rate']}, β {c['beta']}, LoRA rank "
        f"{c['lora_rank']}. Runtime {t['total_s']:.0f} s on {result['cpu_count']} cores, load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['load_average'])}."
        + (" **One training seed: the intervals cover the held-out captions only, not the spread between training "
           "seeds** (in the v1 run two seeds differed by up to 0.05)." if len(done) == 1 else ""), "",
        "| scenario | noise | method | gain | 95 % CI | per seed | share of clean DPO gain | vs DPO (95 % CI) "
        "| Δcolour | Δsharp | Δexposure |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["table"]:
        share = "" if r["share_of_clean_dpo_gain"] is None else f"{r['share_of_clean_dpo_gain']:.2f}"
        vs_dpo = ("" if "vs_dpo" not in r or r["method"] == "dpo" else
                  f"{r['vs_dpo']:+.4f} [{r['vs_dpo_ci_low']:+.4f}, {r['vs_dpo_ci_high']:+.4f}]")
        lines.append(
            f"| {r['scenario']} | {r['noise']:.0%} | {r['method']} | {r['gain']:+.4f} "
            f"| [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {', '.join(f'{g:+.4f}' for g in r['seed_gains'])} "
            f"| {share} | {vs_dpo} | {r['gain_colour_match']:+.4f} | {r['gain_sharpness']:+.4f} "
            f"| {r['gain_exposure_quality']:+.4f} |")
    widths = [(r["vs_dpo_ci_high"] - r["vs_dpo_ci_low"]) / 2 for r in result["table"]
              if "vs_dpo" in r and r["method"] != "dpo"]
    if widths:
        lines += ["", f"Half-width of the 95 % interval of a method-vs-DPO difference: median {np.median(widths):.4f}, "
                      f"max {max(widths):.4f}; {sum(w <= 0.01 for w in widths)} of {len(widths)} rows within ±0.01 "
                      f"(issue 11's target). Headline methods {c.get('headline_methods')} on "
                      f"{c.get('headline_conditions')} also ran training seeds {c.get('headline_seeds')}."]
    policies = sorted({p for d in result["data"].values() for p in d["snapshots"]})
    lines += ["", "Label quality per condition: share of labels whose winner has the higher true (majority) reward; "
              "per snapshot policy the weighted share of truly better winners (Σ weight · correct / Σ weight; "
              "rows kept in brackets); annotator-type detection AUROC (Dawid-Skene reliability, non-reliable vs "
              "reliable annotators with enough labels; n non-reliable / n reliable).", "",
              "| condition | noisy labels | human labels | " + " | ".join(policies) + " | detection AUROC |",
              "|---|---|---|" + "---|" * len(policies) + "---|"]
    for key, d in result["data"].items():
        det = d["annotator_detection"]
        auc = "" if det.get("auroc") is None else f"{det['auroc']:.3f} ({det['n_noisy']}/{det['n_reliable']})"
        cells = [f"{d['snapshots'][p]['weighted_truly_better']:.3f} ({d['snapshots'][p]['rows']})"
                 if p in d["snapshots"] else "" for p in policies]
        lines.append(f"| {key} | {d['noisy_label_share']:.3f} | {d['label_agrees_with_truth']:.3f} | "
                     + " | ".join(cells) + f" | {auc} |")
    lines += ["", "Claims (95 % intervals from the same two-level bootstrap; 'not resolved': the interval straddles "
              "the threshold):", "", "| claim | condition | value | 95 % CI | verdict |", "|---|---|---|---|---|"]
    for v in result.get("verdicts", []):
        ci = "" if v["ci"] is None else f"[{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}]"
        lines.append(f"| {v['claim']} | {v['condition']} | {v['value']:+.4f} | {ci} | {v['verdict']} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = config_from_dict(result["config"])
    table = result["table"]
    fig, axes = plt.subplots(1, len(c.scenarios), figsize=(4.2 * len(c.scenarios), 4), sharey=True, squeeze=False)
    for ax, scenario in zip(axes[0], c.scenarios, strict=True):
        for k, method in enumerate(c.methods):
            rows = [r for r in table if r["method"] == method and (r["scenario"] == scenario
                                                                   or (r["scenario"], r["noise"]) == CLEAN)]
            if not rows:
                continue
            x = np.array([100 * r["noise"] for r in rows]) + (k - len(c.methods) / 2) * 0.8
            y = np.array([r["gain"] for r in rows])
            err = np.array([[r["gain"] - r["ci_low"] for r in rows], [r["ci_high"] - r["gain"] for r in rows]])
            ax.errorbar(x, y, yerr=err, marker="o", capsize=2, label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("labels not from reliable annotators (%)")
        ax.set_title(f"scenario: {scenario}", fontsize=10)
    axes[0][0].set_ylabel("true-reward gain over base (95 % CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> tuple[ExperimentConfig | None, tuple[Path, tuple] | None]:
    """(config to run, None), or (None, (output folder, folders to merge)) for ``--resummarise``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="toy sizes, a few steps (~1 min)")
    defaults = ExperimentConfig()
    for f in fields(ExperimentConfig):
        if f.name == "pretrain":
            continue
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            parser.add_argument("--" + f.name.replace("_", "-"), action="store_true", default=None)
            continue
        kind = (type(value[0]) if value else str) if isinstance(value, tuple) else type(value)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            nargs="+" if isinstance(value, tuple) else None)
    parser.add_argument("--resummarise", action="store_true", help="rebuild the report in --out from results.json")
    parser.add_argument("--merge", nargs="+", default=(), help="with --resummarise: join these runs' results first")
    args = vars(parser.parse_args(argv))
    quick = args.pop("quick")
    merge = tuple(Path(m) for m in args.pop("merge"))
    if args.pop("resummarise"):
        return None, (Path(args["out"] or defaults.out), merge)
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
    try:
        config, report_only = parse_args(sys.argv[1:])
        if config is not None and config.workers > 1:
            print(markdown(run_workers(config, sys.argv[1:])))
        elif config is not None and config.curate_only:
            print(json.dumps(run(config)["data"], indent=1, default=str))
        else:
            print(markdown(resummarise(*report_only) if report_only else run(config)))
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
