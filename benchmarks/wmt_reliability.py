"""How well annotator reliability ranks real judges: the WMT13 fr-en manual rankings (shared data).

There is no gold label per comparison, so a judge's "true" accuracy is measured against the experts:
the share of the judge's decisive labels that agree with the leave-one-out majority of the
*researcher* judges' decisive labels on the same pair of translations (the judge's own labels left
out; items with no researcher or a split left out). Printed: Spearman rank correlation between that
accuracy and each reliability column of the annotators table, over judges with at least --min-labels
such labels (all judges, then turkers only).

    .venv/bin/python benchmarks/wmt_reliability.py [--data ../shared/data] [--lake DIR] [--min-labels 20]
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import numpy as np
import polars as pl

WMT = "wmt13_fr-en_rankings_train.csv"
COLUMNS = ["reliability_dawid_skene", "reliability_beta_binomial", "agreement_shrunk", "peer_majority_agreement",
           "peer_agreement"]


def spearman(a: pl.Series, b: pl.Series) -> float:
    return float(np.corrcoef(a.rank().to_numpy(), b.rank().to_numpy())[0, 1])


def expert_accuracy(pairs: pl.DataFrame, min_labels: int) -> pl.DataFrame:
    """user_id, accuracy against the leave-one-out researcher majority, n_truth (>= min_labels)."""
    p = (pairs.filter(pl.col("label_0").is_in([0.0, 1.0]))
         .with_columns(lo=pl.min_horizontal("image_0_id", "image_1_id"), hi=pl.max_horizontal("image_0_id", "image_1_id"),
                       expert=pl.col("user_id").str.starts_with("researcher")))
    p = p.with_columns(first=(pl.col("label_0") == 1.0) == (pl.col("image_0_id") == pl.col("lo")))
    item = p.group_by("lo", "hi").agg(k=(pl.col("first") & pl.col("expert")).sum(), n=pl.col("expert").sum())
    own = p.group_by("lo", "hi", "user_id").agg(k_own=(pl.col("first") & pl.col("expert")).sum(),
                                                n_own=pl.col("expert").sum())
    p = (p.join(item, on=["lo", "hi"]).join(own, on=["lo", "hi", "user_id"])
         .with_columns(k=pl.col("k") - pl.col("k_own"), n=pl.col("n") - pl.col("n_own"))
         .filter((pl.col("n") > 0) & (2 * pl.col("k") != pl.col("n")))
         .with_columns(correct=pl.col("first") == (2 * pl.col("k") > pl.col("n"))))
    return (p.group_by("user_id").agg(accuracy=pl.col("correct").mean(), n_truth=pl.len())
            .filter(pl.col("n_truth") >= min_labels))


def main(argv: list[str] | None = None) -> None:
    from prefcurate.curation.labels.curate import curate, current_run, load_pairs
    from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
    from prefcurate.curation.store.lake import Lake

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lake", help="lake folder to use (ingested once); default a temporary one")
    parser.add_argument("--min-labels", type=int, default=20)
    parser.add_argument("--data", default=os.environ.get("PREFCURATE_SHARED_DATA", "../shared/data"),
                        help=f"folder holding {WMT} (default $PREFCURATE_SHARED_DATA or ../shared/data)")
    args = parser.parse_args(argv)
    source = os.path.join(args.data, WMT)
    if not os.path.isfile(source):
        raise SystemExit(f"{source} not found: give --data (the team's shared data folder)")
    tmp = None if args.lake else tempfile.mkdtemp()
    root = args.lake or os.path.join(tmp, "lake")
    try:
        if not os.path.exists(os.path.join(root, "_lake.json")):
            ingest_file(Lake(root, create=True), source, IngestConfig("wmt13", "wmt"), make_reader("wmt"))
        lake = Lake(root)
        curate(lake)
        stats = pl.read_parquet(lake.join("curation", current_run(lake)["run_id"], "annotators.parquet"))
        frame = expert_accuracy(load_pairs(lake), args.min_labels).join(stats, on="user_id")
        for title, part in (("all judges", frame), ("turkers", frame.filter(pl.col("user_id").str.starts_with("turker")))):
            print(f"{title}: {part.height} with >= {args.min_labels} expert-judged labels")
            for column in COLUMNS:
                known = part.filter(pl.col(column).is_not_null())
                print(f"  Spearman(accuracy, {column:<26}) = {spearman(known['accuracy'], known[column]):6.3f}"
                      f"  (n={known.height})")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
