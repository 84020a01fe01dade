"""`prefcurate demo`: the pipeline on the embedded sample, offline, through the stage functions the flows
wrap (flows/stages.py): no Prefect server is started."""
from __future__ import annotations

import glob
import os
import time

from prefcurate.curation.ingest import quarantine_reasons
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.report.page import write_report
from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample
from prefcurate.curation.snapshot import SnapshotPolicy
from prefcurate.curation.store.sql import query
from prefcurate.data_schemas.vocab import WEIGHT_FREE_SCORERS
from prefcurate.flows.stages import run_curate, run_ingest, run_score, run_snapshot, run_train


BUSIEST_ANNOTATORS = """
SELECT user_id, count(*) AS labels,
       round(avg(CASE WHEN label_0 = 0.5 THEN 1 ELSE 0 END), 3) AS tie_rate,
       round(avg(CASE WHEN label_0 = 1 THEN 1.0 WHEN label_0 = 0 THEN 0.0 END), 3) AS left_rate
FROM pairs GROUP BY user_id ORDER BY labels DESC LIMIT 5
"""
# The weight-free scorers: they need no checkpoint, so the demo stays offline and fast.
DEMO_SCORERS = list(WEIGHT_FREE_SCORERS)
LEAST_RELIABLE = """
SELECT user_id, n_labels, round(reliability, 3) AS reliability, round(consensus_agreement, 3) AS agreement,
       round(left_rate, 3) AS left_rate, round(minority_rate, 3) AS minority_rate
FROM annotators WHERE n_labels >= 10 ORDER BY reliability LIMIT 5
"""
STEPS = 6
# A few steps on a tiny SD-style pipeline built offline: enough to show the loop, the metrics and the
# LoRA file, in seconds on a CPU. Real runs: `prefcurate train --model SD_DIR ...` on a GPU.
DEMO_TRAIN_OPTIONS = ["--max-steps", "12", "--train-batch-size", "4", "--resolution", "32", "--learning-rate",
                      "1e-3", "--checkpoint-every", "1000", "--overwrite-output"]  # `make demo` twice


def run_demo(out_dir: str, seed: int = 0) -> Lake:
    started = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    print(f"[1/{STEPS}] generating the embedded sample (seed {seed}) in {out_dir}/sample")
    paths = generate_sample(os.path.join(out_dir, "sample"), SampleConfig(seed=seed))
    shards = sorted(glob.glob(os.path.join(paths.pickapic_dir, "*.parquet")))
    lake_root = os.path.join(out_dir, "lake")
    print(f"[2/{STEPS}] ingesting {len(shards)} Pick-a-Pic-shaped shard(s) into {lake_root}")
    for r in run_ingest(lake_root, shards, "pickapic"):
        print("  " + (f"error: {r['error']}" if "error" in r else
                      f"{os.path.basename(r['source_file'])}: read {r['n_read']} = accepted {r['n_accepted']} "
                      f"+ duplicates {r['n_duplicates']} + quarantined {r['n_quarantined']}"))
    print(f"[3/{STEPS}] scoring the pairs' images with {', '.join(DEMO_SCORERS)}")
    # One shard per scorer and decoding in this process: at 64 px, worker start-up would cost more than it saves.
    summaries = run_score(lake_root, DEMO_SCORERS, workers=0, shard_size=1 << 20)
    print("  throughput (images/s): " + ", ".join(f"{s['name']} {s['images_per_s']:.0f}" for s in summaries)
          + f" ({summaries[0]['n_images']} images; {summaries[0]['n_pairs_skipped']} pairs skipped)")
    print(f"[4/{STEPS}] curating: scorer votes, consensus, minority scores, annotator reliability")
    print("  " + run_curate(lake_root)["line"])
    print(f"[5/{STEPS}] writing an adaptive (reweighted) training snapshot")
    snapshot = run_snapshot(lake_root, "demo-adaptive", SnapshotPolicy(kind="adaptive"))
    print("  " + snapshot["line"])
    print(f"[6/{STEPS}] fine-tuning a tiny offline SD-style pipeline on it with Adaptive-DPO (LoRA, CPU)")
    from prefcurate.training.components import build_tiny_pipeline

    model = build_tiny_pipeline(os.path.join(out_dir, "tiny-sd"), resolution=32)
    run_dir = os.path.join(out_dir, "runs", "adaptive-dpo")
    trained = run_train(snapshot["path"], str(model), run_dir, loss="adaptive-dpo", options=DEMO_TRAIN_OPTIONS)
    print(f"  {trained['global_step']} steps, loss {trained['losses'][0]:.4f} -> {trained['final_loss']:.4f}; "
          f"LoRA (diffusers format, loads with pipe.load_lora_weights) in {trained['lora_dir']}")
    lake = Lake(lake_root)
    totals = query(lake, "SELECT sum(n_read) r, sum(n_accepted) a, sum(n_duplicates) d, sum(n_quarantined) q "
                         "FROM ingests").to_pylist()[0]
    print(f"\nlake: {totals['r']} rows read = {totals['a']} accepted + {totals['d']} duplicates "
          f"+ {totals['q']} quarantined")
    print("quarantine reasons: " + ", ".join(f"{k} {v}" for k, v in quarantine_reasons(lake).items()))
    print("busiest annotators (prefcurate sql):")
    for row in query(lake, BUSIEST_ANNOTATORS).to_pylist():
        print(f"  user {row['user_id']:>6}: {row['labels']:>4} labels, tie rate {row['tie_rate']}, "
              f"left rate {row['left_rate']}")
    print("least reliable annotators (prefcurate sql ... FROM annotators):")
    for row in query(lake, LEAST_RELIABLE).to_pylist():
        print(f"  user {row['user_id']:>6}: {row['n_labels']:>4} labels, reliability {row['reliability']}, "
              f"agreement with scorers {row['agreement']}, left rate {row['left_rate']}, "
              f"minority rate {row['minority_rate']}")
    print(write_report(lake, os.path.join(out_dir, "report.html"), run_dir=run_dir).line())
    print(f"\ndone in {time.perf_counter() - started:.1f} s. Query it yourself:\n"
          f"  prefcurate sql --lake {lake_root} \"SELECT * FROM ingests\"")
    return lake
