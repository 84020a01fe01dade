"""Scoring benchmark: our runner against the naive loop of the reference packages, same model, same images.

  naive: the loop of the hpsv2 README (`hpsv2.score(paths, prompt)`, i.e. hpsv2/img_score.py), built on its
         own: `open_clip.create_model_and_transforms(arch)` (random init, pretrained=None), the HPS
         checkpoint's `state_dict` loaded into it, `open_clip.get_tokenizer(arch)`, `model.eval()`; then for
         each image file `preprocess_val(Image.open(path)).unsqueeze(0)` (resize to the model's 224 px),
         `tokenizer([prompt])`, one `model(image, text)` forward under no_grad,
         `diag(image_features @ text_features.T)`; batch 1, the prompt tokenised and encoded for every
         image, torch's default threads. (The PickScore README does the same per prompt with its processor;
         hpsv2.score also reloads the checkpoint on every call, which is left out here: it would only widen
         the gap.) Nothing of ours (model object, transform, tokenizer) is shared with it.
  ours:  curation.scorers.runner.run_scoring over a lake holding the same images (worker processes decode and
         preprocess, batched image tower, each prompt encoded once, rows committed to the lake).
Both score (image, prompt) items the lake's pairs need with an open_clip architecture at random weights
(pretrained=None), saved as an HPS-style checkpoint, on images of the datasets' size (512 px: Pick-a-Pic
and HPDv2 images are 512-1024 px). Rates are (image, prompt) items per second; timings exclude model
loading and worker start. The two sides run interleaved for `--repeats` rounds, the order alternating
(ours then naive, naive then ours, ...), so load on a shared machine hits both alike: each round scores
the whole lake with ours (a fresh copy of the unscored lake) and the round's own slice of
`--naive-items` items naively (together at least 100 distinct items by default). The report gives each
round's ratio and their min and median, and compares every naive score with ours (max |difference|).

    .venv/bin/python benchmarks/bench_scoring.py                      # CPU, ViT-B-32, 128 naive items, < 5 min
    .venv/bin/python benchmarks/bench_scoring.py --arch ViT-H-14 --device cuda --dtype bf16 --batch-size 128 \\
        --workers 8 --prompts 400

On CUDA it also reports achieved TFLOP/s of the image tower against --peak-tflops (H100 SXM dense bf16:
989). FLOPs per image are counted with torch.utils.flop_counter (2 per multiply-add, the convention of
open_clip's `gflops` column, whose ViT-H-14 image tower figure is 334.6 GFLOPs = 2 x 167.3 GMACs).
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import open_clip
import torch
from PIL import Image


VIT_H14_IMAGE_GFLOPS = 334.6  # open_clip model_profile (torch flop counter: FLOPs, not MACs), 224 px


def build_lake(root: str, prompts: int, size: int, seed: int):
    from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample

    config = SampleConfig(seed=seed, n_prompts=prompts, n_rows=prompts * 12, n_annotators=24, image_size=size,
                          n_shards=1, row_groups_per_shard=2)
    paths = generate_sample(os.path.join(root, "sample"), config)
    lake = Lake(os.path.join(root, "lake"), create=True)
    for shard in sorted(glob.glob(str(paths.pickapic_dir / "*.parquet"))):
        ingest_file(lake, shard, IngestConfig("pickapic", "pickapic"), make_reader("pickapic"))
    return lake


def image_tower_gflops(model, device: torch.device, image_size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device))
    return counter.get_total_flops() / 1e9


def load_naive(arch: str, checkpoint: str, device: torch.device):
    """(model, preprocess_val, tokenizer) the way hpsv2/img_score.py builds them: the open_clip architecture,
    then the checkpoint's state_dict, eval mode. Its own objects: nothing is shared with our scorer."""
    model, _, preprocess_val = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state["state_dict"])
    return model.eval(), preprocess_val, open_clip.get_tokenizer(arch)


def naive_loop(model, preprocess, tokenizer, paths: list[str], prompts: list[str], device: torch.device,
               dtype: torch.dtype | None) -> tuple[np.ndarray, float]:
    """One image at a time, text encoded every time, like hpsv2.score / the PickScore README.
    Returns (scores, items/s over all but the first item, which warms up kernels and allocators)."""
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    scores = []
    started = None
    for k, (path, prompt) in enumerate(zip(paths, prompts)):
        if k == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with torch.no_grad():
            image = preprocess(Image.open(path)).unsqueeze(0).to(device=device, non_blocking=True)
            text = tokenizer([prompt]).to(device=device, non_blocking=True)
            with autocast:
                outputs = model(image, text)  # open_clip: dict or (image_features, text_features, logit_scale)
                image_features, text_features = ((outputs["image_features"], outputs["text_features"])
                                                 if isinstance(outputs, dict) else outputs[:2])
                logits_per_image = image_features @ text_features.T
                scores.append(float(torch.diagonal(logits_per_image).float().cpu().numpy()[0]))
    return np.array(scores), (len(paths) - 1) / (time.perf_counter() - started)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-B-32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of the naive loop; ours uses bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--prompts", type=int, default=28,
                        help="~5 images per prompt in the sample lake (16 or more: the sample needs 24 annotators)")
    parser.add_argument("--size", type=int, default=512, help="image side in px (Pick-a-Pic, HPDv2: 512-1024)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--naive-items", type=int, default=32,
                        help="items each round scores naively, a different slice each round (0: all, every round)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved rounds, the order alternating")
    parser.add_argument("--control-threads", type=int, default=1,
                        help="also run the naive slice with this many torch threads each round (0: no control): "
                             "with other jobs on the cores, batch-1 forwards at the default threads wait at "
                             "every OpenMP barrier for a descheduled thread, which the control shows")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for the dtype (H100 SXM bf16)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompts < 16:
        parser.error(f"--prompts must be 16 or more (the sample lake needs 24 annotators), got {args.prompts}")
    return args


def _setup(args: argparse.Namespace, work: str):
    """The sample lake, a random-weight HPSv2 checkpoint, the scorer, and the plan's items written as image
    files (the reference packages read files from disk): (lake, weights folder, scorer, items, paths)."""
    from prefcurate.curation.scorers import build_scorer
    from prefcurate.curation.scorers.plan import plan_work

    t0 = time.perf_counter()
    lake = build_lake(work, args.prompts, args.size, args.seed)
    torch.manual_seed(args.seed)
    model = open_clip.create_model(args.arch, pretrained=None)
    weights = os.path.join(work, "weights")
    os.makedirs(weights)
    torch.save({"state_dict": model.state_dict()}, os.path.join(weights, "HPS_v2_compressed.pt"))
    del model
    scorer = build_scorer("hpsv2", weights, args.device, arch=args.arch, batch_size=args.batch_size)
    items = plan_work(lake, scorer).items.to_pylist()
    images = {r["image_id"]: r["bytes"] for r in lake.read("images", ["image_id", "bytes"]).to_pylist()}
    os.makedirs(os.path.join(work, "files"))
    paths = []
    for item in items:
        path = os.path.join(work, "files", item["image_id"])
        with open(path, "wb") as f:
            f.write(images[item["image_id"]])
        paths.append(path)
    print(f"setup {time.perf_counter() - t0:.1f} s: {len(items)} (image, prompt) items, "
          f"{len(set(r['prompt_id'] for r in items))} prompts, {args.size} px, {args.arch}, {args.device}")
    return lake, weights, scorer, items, paths


def _score_ours(lake, fresh: str, weights: str, args: argparse.Namespace):
    """run_scoring on a fresh copy of the lake: (scorer summary, {(image_id, prompt_id): score})."""
    from prefcurate.curation.store.lake import Lake
    from prefcurate.curation.scorers.runner import run_scoring

    shutil.copytree(lake.root, fresh)
    ours = run_scoring(Lake(fresh), ["hpsv2"], weights, args.device, args.batch_size, args.workers,
                       scorer_options={"hpsv2": {"arch": args.arch}}).scorers[0]
    scores = {(r["image_id"], r["prompt_id"]): r["score"] for r in Lake(fresh).read("scores").to_pylist()}
    shutil.rmtree(fresh, ignore_errors=True)
    return ours, scores


def _score_naive(naive: tuple, paths: list[str], prompts: list[str], device, dtype, control_threads: int):
    """The naive loop at the default threads, then (control_threads > 0) again at control_threads:
    (scores, items/s, control items/s or None)."""
    scores, rate = naive_loop(*naive, paths, prompts, device, dtype)
    if not control_threads:
        return scores, rate, None
    default_threads = torch.get_num_threads()
    torch.set_num_threads(control_threads)
    try:
        _, control_rate = naive_loop(*naive, paths, prompts, device, dtype)
    finally:
        torch.set_num_threads(default_threads)
    return scores, rate, control_rate


def _print_summary(args, rounds: list, controls: list, per_round: int, naive_done: set, diff: float,
                   load_before: float, device, scorer) -> None:
    ratios = [o / n for o, n, _ in rounds]
    print(f"\nhost: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
          f"{torch.__version__}, default threads {torch.get_num_threads()}, load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
          + (f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    print(f"| path | items per round | items/s (median of {len(rounds)}) |\n|---|---|---|\n"
          f"| naive loop (hpsv2 README / img_score.py, batch 1, text every time) | {per_round} "
          f"({len(naive_done)} distinct over the rounds) | {np.median([n for _, n, _ in rounds]):.2f} |\n"
          f"| prefcurate run_scoring (batch {args.batch_size}, {args.workers} workers) | {rounds[0][2]} | "
          f"{np.median([o for o, _, _ in rounds]):.2f} |")
    print(f"ratio ours / naive over {len(rounds)} interleaved rounds: min {min(ratios):.2f}x, median "
          f"{np.median(ratios):.2f}x   (max |score difference| over {len(naive_done)} items {diff:.2e})")
    if controls:
        control_ratios = [o / c for (o, _, _), c in zip(rounds, controls)]
        print(f"control, the naive loop at {args.control_threads} torch thread(s): median "
              f"{np.median(controls):.2f} items/s; ratio ours / control min {min(control_ratios):.2f}x, median "
              f"{np.median(control_ratios):.2f}x")
    if device.type == "cuda":
        gflops = image_tower_gflops(scorer.model, device, scorer.model.visual.image_size[0])
        ours_rate, naive_rate = np.median([o for o, _, _ in rounds]), np.median([n for _, n, _ in rounds])
        ours_tflops, naive_tflops = ours_rate * gflops / 1e3, naive_rate * gflops / 1e3
        print(f"image tower: {gflops:.1f} GFLOPs/image measured (open_clip table, ViT-H-14: "
              f"{VIT_H14_IMAGE_GFLOPS}); achieved {ours_tflops:.1f} TFLOP/s ours, {naive_tflops:.1f} naive "
              f"= {100 * ours_tflops / args.peak_tflops:.1f}% / {100 * naive_tflops / args.peak_tflops:.1f}% "
              f"of {args.peak_tflops:.0f} TFLOP/s peak")


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    work = tempfile.mkdtemp(prefix="bench-scoring-")
    try:
        lake, weights, scorer, items, paths = _setup(args, work)
        naive = load_naive(args.arch, os.path.join(weights, "HPS_v2_compressed.pt"), device)
        per_round = min(args.naive_items or len(items), len(items))
        rounds, controls, diff, naive_done = [], [], 0.0, set()
        load_before = os.getloadavg()[0]
        for k in range(args.repeats):
            start = (k * per_round) % len(items)
            picked = [(start + j) % len(items) for j in range(per_round)]
            chosen = [items[j] for j in picked]
            order = ("ours", "naive") if k % 2 == 0 else ("naive", "ours")
            for side in order:
                if side == "ours":
                    ours, ours_scores = _score_ours(lake, os.path.join(work, f"lake-{k}"), weights, args)
                    ours_rate = ours.n_scores / ours.seconds
                else:
                    naive_scores, naive_rate, control_rate = _score_naive(
                        naive, [paths[j] for j in picked], [r["prompt"] for r in chosen], device, dtype,
                        args.control_threads)
            diff = max([diff] + [abs(ours_scores[(r["image_id"], r["prompt_id"])] - s)
                                 for r, s in zip(chosen, naive_scores)])
            naive_done.update((r["image_id"], r["prompt_id"]) for r in chosen)
            rounds.append((ours_rate, naive_rate, ours.n_scores))
            control = ""
            if args.control_threads:
                controls.append(control_rate)
                control = (f"; control: naive at {args.control_threads} thread(s) {control_rate:.2f} items/s, "
                           f"ratio {ours_rate / control_rate:.2f}x")
            print(f"round {k + 1} ({' then '.join(order)}): ours {ours_rate:.2f} items/s ({ours.n_scores} items), "
                  f"naive {naive_rate:.2f} items/s ({per_round} items), ratio {ours_rate / naive_rate:.2f}x{control}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        _print_summary(args, rounds, controls, per_round, naive_done, diff, load_before, device, scorer)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
