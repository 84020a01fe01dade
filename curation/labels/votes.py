"""Per-pair scorer votes: per-image scores (lake `scores` table) -> one row per (pair, scorer).

A scorer's *margin* on a pair is `s(image_0) - s(image_1)`, sign-flipped for lower-is-better
scorers, so that a positive margin always means "the scorer prefers image_0". Its *vote* is the
sign of the margin mapped to the `label_0` convention of the pairs table (1.0 = image_0,
0.0 = image_1, 0.5 = exact tie). Its *normalized margin* divides the margin by the scorer's
dataset-wide spread of margins, so margins of scorers on different scales (a cosine near 0.2,
an aesthetic score near 5) become comparable: one unit = one typical margin of that scorer.
This is the dataset-wide stand-in for the per-batch L2 normalisation of Adaptive-DPO
(`docs/methods.md` §2.3); see `prefcurate.curation.labels.pair_metrics` for how it is used.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc


logger = logging.getLogger(__name__)

# prompt_id under which prompt-free scorers (aesthetic, sharpness, ...) store their scores;
# such scorers are joined on image_id only, so any prompt_id they carry is ignored.
PROMPT_FREE_PROMPT_ID = ""

# 1.4826 * median|x| estimates sigma for a zero-mean normal x (1 / Phi^-1(3/4)).
MAD_TO_SIGMA = 1.4826

VOTE_COLUMNS = ["pair_id", "scorer", "score_0", "score_1", "margin", "vote", "normalized_margin"]
VOTES_SCHEMA = {
    "pair_id": pl.String, "scorer": pl.String, "score_0": pl.Float64, "score_1": pl.Float64,
    "margin": pl.Float64, "vote": pl.Float64, "normalized_margin": pl.Float64,
}

VOTES_ARROW_SCHEMA = pa.schema([(name, pa.large_string() if dtype == pl.String else pa.float64())
                                 for name, dtype in VOTES_SCHEMA.items()])
"""VOTES_SCHEMA as Arrow (large_string: what polars writes, and what the lake's readers expect)."""

Spread = Literal["rms", "mad"]


def as_lazy(data: pl.DataFrame | pl.LazyFrame, name: str, required: list[str]) -> pl.LazyFrame:
    """`data` as a LazyFrame, after checking that it has the `required` columns."""
    if not isinstance(data, (pl.DataFrame, pl.LazyFrame)):
        raise TypeError(f"{name} must be a polars DataFrame or LazyFrame, got {type(data).__name__}")
    lazy = data.lazy()
    missing = [c for c in required if c not in lazy.collect_schema().names()]
    if missing:
        raise ValueError(f"{name} is missing column(s) {missing}; it has {lazy.collect_schema().names()}")
    return lazy


def margin_spread(margin: pl.Expr, spread: Spread) -> pl.Expr:
    """Scale of a scorer's margins over all its pairs (an aggregate over one scorer's rows).

    - "rms": sqrt(mean(margin^2)), the uncentred L2 norm per pair. It is the dataset-wide
      analogue of Adaptive-DPO's per-batch normalisation l_i / ||l||_batch (docs/methods.md §2.3):
      ||l||_batch ~ sqrt(B) * rms, so l_i / ||l||_batch ~ normalized_margin / sqrt(B).
    - "mad": 1.4826 * median(|margin|), a robust version (the MAD about zero, not about the median,
      because the sign of a margin is meaningful). Equals "rms" for zero-mean normal margins; it
      falls back to "rms" when more than half the margins are exact ties (median |margin| = 0).
    A spread of 0 (every margin is 0) gives normalized margins of 0.
    """
    rms = (margin**2).mean().sqrt()
    if spread == "rms":
        return rms
    if spread == "mad":
        mad = MAD_TO_SIGMA * margin.abs().median()
        return pl.when(mad > 0).then(mad).otherwise(rms)
    raise ValueError(f"unknown spread {spread!r}; expected 'rms' or 'mad'")


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


@contextlib.contextmanager
def one_thread(con):
    """The DuckDB connection `con` on one thread inside the block; its thread count is restored after."""
    threads = con.sql("SELECT current_setting('threads')").fetchall()[0][0]
    con.execute("SET threads = 1")
    try:
        yield con
    finally:
        con.execute(f"SET threads = {int(threads)}")


def create_score_tables(con, scores_sql: str, names: list[str], prompt_free: Collection[str],
                        stored_sql: str | None = None) -> None:
    """Temporary DuckDB tables of the scores gone wide: `_scores_pf` (image_id, _s{i} for the prompt-free
    scorers names[i]) and `_scores_pd` (image_id, prompt_id, _s{i} for the others), from the rows of
    `scores_sql` (image_id, prompt_id, scorer, score) whose score is neither null nor NaN. ValueError
    naming the scorers with more than one score per key (image_id, or image_id and prompt_id).
    `stored_sql` (distinct image_id of the images with bytes): `_scores_pf` then lists those images too, with
    a `_stored` column, so that `score_lookup_sql(..., stored=True)` finds both in one join per side.
    Runs on one thread: at 1M pairs (1M score rows) a second one took the same wall time and 0.1 s more CPU."""
    groups = [("_scores_pf", ["image_id"], [n for n in names if n in prompt_free]),
              ("_scores_pd", ["image_id", "prompt_id"], [n for n in names if n not in prompt_free])]
    valid = (f"SELECT image_id, prompt_id, scorer, CAST(score AS DOUBLE) AS score FROM ({scores_sql}) "
             f"WHERE score IS NOT NULL AND NOT isnan(score)")
    duplicated = []
    for table, keys, group in groups:
        if not group:
            continue
        wide = ", ".join(f"max(score) FILTER (WHERE scorer = {_sql_str(n)}) AS _s{names.index(n)}, "
                         f"count(*) FILTER (WHERE scorer = {_sql_str(n)}) AS _c{names.index(n)}" for n in group)
        with one_thread(con):
            con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT {', '.join(keys)}, {wide} FROM ({valid}) "
                        f"WHERE scorer IN ({', '.join(_sql_str(n) for n in group)}) GROUP BY {', '.join(keys)}")
            counts = con.sql(f"SELECT {', '.join(f'max(_c{names.index(n)})' for n in group)} "
                             f"FROM {table}").fetchall()[0]
        duplicated += [n for n, c in zip(group, counts) if c is not None and c > 1]
    if duplicated:
        raise ValueError("scores has duplicate (image_id[, prompt_id], scorer) rows for scorer(s) "
                         f"{sorted(duplicated)}; "
                         "keep one scorer_version per scorer first")
    if stored_sql is not None:
        free = [f"f._s{names.index(n)}" for n in names if n in prompt_free]
        scored = "_scores_pf" if free else "(SELECT NULL::VARCHAR AS image_id WHERE false)"
        con.execute(f"CREATE OR REPLACE TEMP TABLE _scores_pf AS SELECT coalesce(s.image_id, f.image_id) AS image_id, "
                    f"s.image_id IS NOT NULL AS _stored{''.join(', ' + c for c in free)} "
                    f"FROM ({stored_sql}) s FULL JOIN {scored} f ON f.image_id = s.image_id")


def score_lookup_sql(pairs_sql: str, names: list[str], prompt_free: Collection[str], pair_columns: list[str],
                     stored: bool = False) -> str:
    """DuckDB SQL: each row of `pairs_sql` (its `pair_columns`) with the scores of its two images, as
    columns _s{i}_0 and _s{i}_1 for scorer names[i] (NULL when missing, null or NaN), from the tables
    of `create_score_tables` (call it first, on the same connection). `stored` (the tables made with
    `stored_sql`): also images_available, whether both images have bytes, after `pair_columns`.

    `pairs_sql` must have prompt_id, image_0_id, image_1_id. Prompt-free scorers are looked up by
    image_id alone, the others by (image_id, prompt_id): each side of a pair is one hash join of the
    pairs against the much smaller wide score table, which DuckDB streams and spills."""
    select = [f"_p.{c}" for c in pair_columns]
    if stored:
        select.append("(coalesce(_scores_pf0._stored, false) AND coalesce(_scores_pf1._stored, false)) "
                      "AS images_available")
    joins = []
    for table, group in (("_scores_pf", [n for n in names if n in prompt_free]),
                         ("_scores_pd", [n for n in names if n not in prompt_free])):
        if not group and not (stored and table == "_scores_pf"):
            continue
        for side in ("0", "1"):
            alias = f"{table}{side}"
            on = f"{alias}.image_id = _p.image_{side}_id"
            if table == "_scores_pd":
                on += f" AND {alias}.prompt_id = _p.prompt_id"
            joins.append(f"LEFT JOIN {table} {alias} ON {on}")
            select += [f"{alias}._s{names.index(n)} AS _s{names.index(n)}_{side}" for n in group]
    return f"SELECT {', '.join(select)} FROM ({pairs_sql}) _p " + " ".join(joins)


def _margin(i: int, higher_is_better: bool) -> pl.Expr:
    """Scorer i's margin toward image_0 from the wide columns (null when either score is missing)."""
    return (1.0 if higher_is_better else -1.0) * (pl.col(f"_s{i}_0") - pl.col(f"_s{i}_1"))


class SpreadAccumulator:
    """Each scorer's spread of margins (`margin_spread`) over wide frames added one chunk at a time.
    "rms" keeps two numbers per scorer; "mad" keeps every |margin| (8 bytes per vote) for the median."""

    def __init__(self, scorers: Mapping[str, bool], spread: Spread = "rms"):
        if spread not in ("rms", "mad"):
            raise ValueError(f"unknown spread {spread!r}; expected 'rms' or 'mad'")
        self.scorers, self.spread = dict(scorers), spread
        self.sum_squares = dict.fromkeys(scorers, 0.0)
        self.count = dict.fromkeys(scorers, 0)
        self.absolute: dict[str, list[np.ndarray]] = {name: [] for name in scorers}

    def add(self, wide: pl.DataFrame) -> None:
        margins = wide.select(**{f"m{i}": _margin(i, up) for i, up in enumerate(self.scorers.values())})
        for i, name in enumerate(self.scorers):
            m = margins[f"m{i}"].drop_nulls().to_numpy()  # (n,) this chunk's margins of the scorer
            self.sum_squares[name] += float(np.dot(m, m))
            self.count[name] += m.size
            if self.spread == "mad":
                self.absolute[name].append(np.abs(m))

    def result(self) -> dict[str, float]:
        """scorer -> spread (0 when the scorer has no vote, or every margin is 0)."""
        out = {}
        for name in self.scorers:
            rms = math.sqrt(self.sum_squares[name] / self.count[name]) if self.count[name] else 0.0
            if self.spread == "mad" and self.count[name]:
                mad = MAD_TO_SIGMA * float(np.median(np.concatenate(self.absolute[name])))
                out[name] = mad if mad > 0 else rms
            else:
                out[name] = rms
        return out


def rms_spreads_sql(lookup_sql: str, scorers: Mapping[str, bool]) -> str:
    """DuckDB SQL of one row: for scorer i, the sum of its squared margins (_q{i}) and their count (_n{i})
    over the rows of `lookup_sql` (with the _s{i}_0, _s{i}_1 columns of `score_lookup_sql`), i.e. the
    "rms" spread as an aggregate."""
    columns = []
    for i, up in enumerate(scorers.values()):
        margin = f"({'' if up else '-'}(_s{i}_0 - _s{i}_1))"
        columns += [f"sum({margin} * {margin}) AS _q{i}", f"count({margin}) AS _n{i}"]
    return f"SELECT {', '.join(columns)} FROM ({lookup_sql})"


def rms_spreads(con, lookup_sql: str, scorers: Mapping[str, bool], *, deterministic: bool = False) -> dict[str, float]:
    """scorer -> sqrt(mean(margin^2)) over `lookup_sql`, in one DuckDB aggregate (no rows leave DuckDB);
    0 for a scorer without votes. The same value as SpreadAccumulator(..., "rms") up to summation order.

    DuckDB's threads each sum a share of the rows and the partial sums are added in the order the
    threads finish, so the last bits vary between runs. `deterministic`: the aggregate runs on one
    thread, summing in the scan order of `lookup_sql` (give it a fixed order, e.g. a table inserted
    in sorted order); the connection's thread count is restored afterwards."""
    if not deterministic:
        row = con.sql(rms_spreads_sql(lookup_sql, scorers)).fetchall()[0]
    else:
        with one_thread(con):
            row = con.sql(rms_spreads_sql(lookup_sql, scorers)).fetchall()[0]
    return {name: math.sqrt(row[2 * i] / row[2 * i + 1]) if row[2 * i + 1] else 0.0 for i, name in enumerate(scorers)}


def vote_rows(wide: pl.DataFrame, scorers: Mapping[str, bool], spreads: Mapping[str, float],
              keep: tuple[str, ...] = ()) -> pl.DataFrame:
    """VOTE_COLUMNS rows from a frame of pair_id and wide score columns (`score_lookup_sql`): one per
    (pair, scorer) with both scores, grouped by scorer in the order of `scorers`, pairs in frame order.
    `keep`: more columns of `wide` to carry along (after VOTE_COLUMNS)."""
    parts = []
    for i, (name, up) in enumerate(scorers.items()):
        spread = spreads[name]
        parts.append(
            wide.lazy().select("pair_id", *keep, scorer=pl.lit(name), score_0=pl.col(f"_s{i}_0"),
                               score_1=pl.col(f"_s{i}_1"), margin=_margin(i, up))
            .filter(pl.col("margin").is_not_null())
            # a NaN margin (two infinite scores) is a tie; polars would order NaN above every number
            .with_columns(vote=pl.when(pl.col("margin").is_nan()).then(0.5).when(pl.col("margin") > 0).then(1.0)
                          .when(pl.col("margin") < 0).then(0.0).otherwise(0.5),
                          normalized_margin=(pl.col("margin") / spread) if spread > 0 else pl.lit(0.0)))
    if not parts:
        return pl.DataFrame(schema=VOTES_SCHEMA).hstack(wide.clear().select(keep))
    return pl.concat(parts).select(*VOTE_COLUMNS, *keep).cast(VOTES_SCHEMA).collect()


@dataclass
class WideVotes:
    """The scorer votes of a chunk of pairs in wide form: (M scorers, P pairs) arrays, the way the
    score lookup (`score_lookup_sql`) delivers them. Consensus counts and pair-metric sums are
    column-wise sums over the M rows, no group-by on pair ids; `table` gives the long VOTE_COLUMNS rows."""

    names: tuple[str, ...]
    score_0: np.ndarray  # (M, P) float64; NaN where the score is missing
    score_1: np.ndarray  # (M, P)
    voted: np.ndarray  # (M, P) bool: both images of the pair have the scorer's score
    margin: np.ndarray  # (M, P) toward image_0: sign * (score_0 - score_1), sign -1 for lower-is-better
    normalized_margin: np.ndarray  # (M, P) margin / the scorer's spread (0 when the spread is 0)

    @classmethod
    def from_arrow(cls, batch: pa.RecordBatch | pa.Table, scorers: Mapping[str, bool],
                   spreads: Mapping[str, float]) -> WideVotes:
        """From the _s{i}_0, _s{i}_1 columns (scorer i of `scorers`, name -> higher_is_better; NULL = missing)."""
        n, m = batch.num_rows, len(scorers)
        score_0, score_1 = np.empty((m, n)), np.empty((m, n))
        voted = np.empty((m, n), dtype=bool)
        for i in range(m):
            a, b = batch.column(f"_s{i}_0"), batch.column(f"_s{i}_1")
            score_0[i] = a.to_numpy(zero_copy_only=False)  # NULL -> NaN
            score_1[i] = b.to_numpy(zero_copy_only=False)
            voted[i] = pc.and_(pc.is_valid(a), pc.is_valid(b)).to_numpy(zero_copy_only=False)
        sign = np.array([1.0 if up else -1.0 for up in scorers.values()])[:, None]  # (M, 1)
        spread = np.array([spreads[name] for name in scorers])[:, None]  # (M, 1)
        # each (M, P) array made once and then changed in place: a fresh one of a few MB faults its pages in
        with np.errstate(divide="ignore", invalid="ignore"):  # inf - inf: a NaN margin, a tie
            margin = np.subtract(score_0, score_1)
            margin *= sign  # the same floats as the polars form, _margin
            # margin * (1 / spread): polars divides a column by a number so, and the long form must match
            normalized = np.multiply(margin, 1.0 / spread)
        normalized[~(spread[:, 0] > 0)] = 0.0
        return cls(tuple(scorers), score_0, score_1, voted, margin, normalized)

    @functools.cached_property
    def vote(self) -> np.ndarray:
        """(M, P) 1.0 if the scorer prefers image_0, 0.0 if image_1, 0.5 for an exact tie (or a NaN margin)."""
        vote = np.full(self.margin.shape, 0.5)
        vote[self.margin > 0] = 1.0
        vote[self.margin < 0] = 0.0
        return vote

    def counts(self) -> dict[str, np.ndarray]:
        """Per pair (P,): n_scorers, votes_for_0 and mean_margin (mean normalized margin; NaN without a
        vote), the inputs of `prefcurate.curation.labels.consensus.consensus_from_counts`, summed in scorer order."""
        n_scorers = self.voted.sum(axis=0, dtype=np.int64)
        votes_for_0, margin_sum = np.zeros(n_scorers.size), np.zeros(n_scorers.size)
        for vote, normalized, voted in zip(self.vote, self.normalized_margin, self.voted):
            votes_for_0 += np.where(voted, vote, 0.0)
            margin_sum += np.where(voted, normalized, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return {"n_scorers": n_scorers, "votes_for_0": votes_for_0, "mean_margin": margin_sum / n_scorers}

    def table(self, pair_id: pa.Array | pa.ChunkedArray) -> pa.Table:
        """VOTE_COLUMNS rows (VOTES_ARROW_SCHEMA), one per (pair, scorer) with both scores, grouped by
        scorer in the order of `names`, pairs in order: the rows of `vote_rows`. pair_id: (P,) strings."""
        # one chunk per scorer (row-major order: scorer by scorer, pairs in order); a scorer that voted on
        # every pair reuses the pair ids as they are, without a copy
        pair_id = pair_id.cast(pa.large_string())
        if isinstance(pair_id, pa.ChunkedArray):
            pair_id = pair_id.combine_chunks()
        counts = self.voted.sum(axis=1)
        ids = pa.chunked_array([pair_id if k == len(pair_id) else pc.filter(pair_id, pa.array(v))
                                for k, v in zip(counts, self.voted)], type=pa.large_string())
        scorer_code = pa.array(np.repeat(np.arange(len(self.names)), counts))
        scorer = pc.take(pa.array(self.names, pa.large_string()), scorer_code)
        every = bool((counts == len(pair_id)).all())  # every scorer voted on every pair: its arrays need no copy
        columns = [ids, scorer, *(pa.array(values.ravel() if every else values[self.voted]) for values in (
            self.score_0, self.score_1, self.margin, self.vote, self.normalized_margin))]
        return pa.Table.from_arrays(columns, schema=VOTES_ARROW_SCHEMA)


def compute_votes(
    pairs: pl.DataFrame | pl.LazyFrame,
    scores: pl.DataFrame | pl.LazyFrame,
    scorers: Mapping[str, bool],
    *,
    prompt_free: Collection[str] = (),
    spread: Spread = "rms",
) -> pl.DataFrame:
    """One row per (pair, scorer) that has both images scored.

    Args:
        pairs: columns pair_id, prompt_id, image_0_id, image_1_id (the lake `pairs` table).
            Prompt-free scorers' scores are found whatever prompt_id they were stored under
            (conventionally PROMPT_FREE_PROMPT_ID).
        scores: columns image_id, prompt_id, scorer, score (the lake `scores` table); at most one
            row per (image_id, prompt_id, scorer), or per (image_id, scorer) for prompt-free scorers.
        scorers: scorer name -> higher_is_better. Scorers not listed are ignored.
        prompt_free: scorers whose score does not depend on the prompt; joined on image_id only.
        spread: scale used for `normalized_margin` (see `margin_spread`).

    Returns:
        DataFrame[pair_id, scorer, score_0, score_1, margin, vote, normalized_margin] where
        margin = sign * (score_0 - score_1) with sign = +1 (higher is better) or -1, vote = 1.0 if
        margin > 0, 0.0 if margin < 0, 0.5 if margin == 0, and normalized_margin = margin / spread
        of that scorer over all returned pairs. A pair lacking a (non-NaN) score for either image
        gets no row for that scorer; the counts are logged (see also `missing_vote_counts`).
        Rows come grouped by scorer (in the order of `scorers`), pairs in the order of `pairs`.
        The curate stage computes the same rows chunk by chunk from the lake's files
        (`create_score_tables`, `score_lookup_sql`, `rms_spreads`, `vote_rows`).
    """
    import duckdb

    if not scorers:
        raise ValueError("scorers is empty: give at least one scorer name -> higher_is_better")
    unknown = sorted(set(prompt_free) - set(scorers))
    if unknown:
        raise ValueError(f"prompt_free names scorer(s) {unknown} that are not in scorers {sorted(scorers)}")
    accumulator = SpreadAccumulator(scorers, spread)
    pair_frame = as_lazy(pairs, "pairs", ["pair_id", "prompt_id", "image_0_id", "image_1_id"]).select(
        pl.col("pair_id").cast(pl.String), pl.col("prompt_id").cast(pl.String),
        pl.col("image_0_id").cast(pl.String), pl.col("image_1_id").cast(pl.String)).collect()
    score_frame = as_lazy(scores, "scores", ["image_id", "prompt_id", "scorer", "score"]).select(
        pl.col("image_id").cast(pl.String), pl.col("prompt_id").cast(pl.String), pl.col("scorer").cast(pl.String),
        pl.col("score").cast(pl.Float64)).collect()
    names = list(scorers)
    con = duckdb.connect()
    try:
        con.register("_pairs_in", pair_frame.with_row_index("_r").to_arrow())
        con.register("_scores_in", score_frame.to_arrow())
        create_score_tables(con, "SELECT * FROM _scores_in", names, prompt_free)
        lookup = score_lookup_sql("SELECT * FROM _pairs_in", names, prompt_free, ["_r", "pair_id"])
        wide = con.sql(lookup).pl().sort("_r")
    finally:
        con.close()
    accumulator.add(wide)
    votes = vote_rows(wide, scorers, accumulator.result())
    if logger.isEnabledFor(logging.INFO):
        counts = missing_vote_counts(pair_frame, votes, list(scorers))
        for scorer, n_missing in counts.iter_rows():
            if n_missing:
                logger.info("compute_votes: %d pair(s) have no %s vote (an image lacks a score)", n_missing, scorer)
    return votes


def missing_vote_counts(
    pairs: pl.DataFrame | pl.LazyFrame, votes: pl.DataFrame | pl.LazyFrame, scorers: Collection[str]
) -> pl.DataFrame:
    """DataFrame[scorer, n_missing]: how many pairs got no vote from each scorer (missing scores)."""
    n_pairs = as_lazy(pairs, "pairs", ["pair_id"]).select(pl.len()).collect().item()
    have = (as_lazy(votes, "votes", ["pair_id", "scorer"]).group_by("scorer").agg(n=pl.len()).collect())
    return (
        pl.DataFrame({"scorer": list(scorers)}, schema={"scorer": pl.String})
        .join(have, on="scorer", how="left")
        .select("scorer", n_missing=(n_pairs - pl.col("n").fill_null(0)).cast(pl.Int64))
    )
