"""`prefcurate curate`: votes, consensus, pair metrics and annotator statistics from the pairs and scores."""
from __future__ import annotations

import argparse
import textwrap

from prefcurate.cli.errors import EXIT_OK, UserError
from prefcurate.cli.tracking import add_track, quiet_prefect_defaults, tracked


def add_parser(sub) -> None:
    p = sub.add_parser("curate", help="compute votes, consensus, pair metrics and annotator statistics",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Recompute the curation tables (votes, consensus, pair_metrics, annotators) from "
                                   "the lake's pairs and scores. A no-op when nothing changed since the last run.",
                       epilog=textwrap.dedent("""\
                           examples:
                             prefcurate curate --lake lake
                             prefcurate curate --lake lake --scorers pickscore,hpsv2,clip,aesthetic --tie-policy drop
                             prefcurate sql --lake lake "SELECT * FROM annotators ORDER BY reliability LIMIT 10"
                           """))
    p.add_argument("--lake", required=True)
    p.add_argument("--scorers", help="comma-separated scorers that vote (default: all scored)")
    p.add_argument("--tie-policy", choices=("drop", "scorer_margin", "human_fallback", "human_vote"), default="drop",
                   help="what decides a pair when the scorers' vote splits (default drop: no label, BalancedDPO's "
                        "scorer-only vote; scorer_margin: the scorers' mean normalized margin)")
    p.add_argument("--reliability", choices=("beta_binomial", "dawid_skene"), default="dawid_skene",
                   help="annotator reliability estimator reported as `reliability` (both are computed)")
    add_track(p)


def run(args) -> int:
    from prefcurate.curation.labels.annotators import AnnotatorStatsConfig
    from prefcurate.curation.labels.curate import CurateConfig
    from prefcurate.curation.store.lake import Lake

    Lake(args.lake)  # a missing lake is one clear line before Prefect starts
    try:
        config = CurateConfig(scorers=tuple(args.scorers.split(",")) if args.scorers else None,
                              tie_policy=args.tie_policy,
                              annotators=AnnotatorStatsConfig(reliability_method=args.reliability))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if tracked(args):
        quiet_prefect_defaults()
        from prefcurate.flows.curate import curate_flow

        print(curate_flow(args.lake, config)["line"])
    else:
        from prefcurate.flows.stages import run_curate

        print(run_curate(args.lake, config)["line"])
    return EXIT_OK
