"""`prefcurate snapshot`: an immutable, content-addressed, weighted training snapshot of the curation run."""
from __future__ import annotations

import argparse

from prefcurate.cli.errors import EXIT_OK, UserError
from prefcurate.cli.tracking import add_track, quiet_prefect_defaults, tracked
from prefcurate.data_schemas.vocab import DEFAULT_SNAPSHOT_POLICY, MINORITY_THRESHOLD, SNAPSHOT_POLICIES


EPILOG = """\
examples:
  prefcurate snapshot --lake lake --name clean --policy filter --max-minority-score 0.5
  prefcurate snapshot --lake lake --name adaptive --policy adaptive
  prefcurate snapshot --lake lake --name balanced --policy balanced
  prefcurate snapshot --lake lake --name trusted --policy reliability --min-posterior 0.6"""


def add_parser(sub) -> None:
    p = sub.add_parser("snapshot", help="write an immutable, weighted training snapshot",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Write a content-addressed training snapshot of the current curation run. "
                                   "Writing the same snapshot again is a no-op.",
                       epilog=EPILOG)
    p.add_argument("--lake", required=True)
    p.add_argument("--name", required=True, help="snapshot name (letters, digits, '_', '.', '-')")
    p.add_argument("--policy", choices=SNAPSHOT_POLICIES, default=DEFAULT_SNAPSHOT_POLICY,
                   help=f"which pairs the snapshot keeps and how it weights them (default {DEFAULT_SNAPSHOT_POLICY})")
    p.add_argument("--max-minority-score", type=float, default=MINORITY_THRESHOLD,
                   help="filter: drop pairs with u above this")
    p.add_argument("--min-reliability", type=float, help="filter: drop pairs of annotators below this reliability")
    p.add_argument("--consensus", choices=("majority", "calibrated"), default="majority",
                   help="balanced: equal scorer votes (BalancedDPO) or votes weighted by scorer reliability")
    p.add_argument("--min-posterior", type=float, default=0.5,
                   help="reliability: drop pairs whose label is right with probability below this (default 0.5)")
    p.add_argument("--posterior-use", choices=("weight", "soft_target", "both"), default="weight",
                   help="reliability: the posterior as loss weight, as label_smoothing = 1 - p, or both")
    p.add_argument("--flip-above", type=float,
                   help="reliability: flip labels whose other image is better with probability >= this (off)")
    p.add_argument("--annotator-group",
                   help="reliability: comma-separated user ids whose own labels form a preference-group snapshot")
    p.add_argument("--splits", default="train", help="comma-separated source splits to include")
    p.add_argument("--out", help="snapshots folder (default: LAKE/snapshots)")
    add_track(p)


def _policy(args):
    """The SnapshotPolicy the options describe; a refused value is a UserError (exit 3)."""
    from prefcurate.curation.store.lake import check_partition_name
    from prefcurate.curation.snapshot import SnapshotError, SnapshotPolicy

    try:
        check_partition_name("snapshot name", args.name)
        return SnapshotPolicy(kind=args.policy, max_minority_score=args.max_minority_score,
                              min_reliability=args.min_reliability, splits=tuple(args.splits.split(",")),
                              consensus=args.consensus, min_posterior=args.min_posterior,
                              posterior_use=args.posterior_use, flip_above=args.flip_above,
                              annotator_group=tuple(args.annotator_group.split(",")) if args.annotator_group
                              else None)
    except (SnapshotError, ValueError) as exc:
        raise UserError(str(exc)) from None


def run(args) -> int:
    from prefcurate.curation.store.lake import Lake

    Lake(args.lake)
    policy = _policy(args)
    if tracked(args):
        quiet_prefect_defaults()
        from prefcurate.flows.curate import snapshot_flow

        print(snapshot_flow(args.lake, args.name, policy, args.out)["line"])
    else:
        from prefcurate.flows.stages import run_snapshot

        print(run_snapshot(args.lake, args.name, policy, args.out)["line"])
    return EXIT_OK
