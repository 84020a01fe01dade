"""`prefcurate report`: one self-contained HTML page about a lake (and optionally a training run).

The page needs no network to view: figures are base64 PNGs (curation/report/plots.py), styles are inline
and there is no script. Every figure is a `<figure id=...>` whose `data-values` attribute holds the numbers
it draws (JSON), so a reader or a test can check them. A stage that has not run yet gives a
`<div class="missing" id="<figure id>-missing" data-needs="<command>">` saying which command to run.

Queries go through curation/store/sql.py's read-only views (pairs, ingests, quarantine, scores, votes,
consensus, pair_metrics, annotators).
"""
from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from prefcurate.curation.report import plots
from prefcurate.curation.labels.curate import current_run, input_versions
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.store.sql import connect
from prefcurate.data_schemas.vocab import MINORITY_THRESHOLD


class MetricsFileError(ValueError):
    """A training run's metrics.jsonl line that is not a metrics record (named with file and line)."""


@dataclass(frozen=True)
class ReportConfig:
    least_reliable: int = 20
    """Rows of the least-reliable-annotators table: a page, not a dump (`prefcurate sql` gives the rest)."""
    min_labels: int = 10
    """Annotators with fewer labels are left out of that table: their reliability is mostly the prior."""
    histogram_bins: int = 40
    """Bins of the minority score u ∈ [0, 1]: 0.025 wide, fine enough to see the mass above the threshold."""


@dataclass
class ReportFigure:
    id: str
    title: str
    alt: str
    caption: str
    png: bytes | None = None
    needs: str | None = None
    """Why there is no plot: the command to run first (shown instead of the figure)."""
    values: dict = field(default_factory=dict)


@dataclass
class ReportResult:
    path: Path
    figures: list[str]
    missing: dict[str, str]

    def line(self) -> str:
        todo = "" if not self.missing else "; not drawn yet: " + ", ".join(
            f"{k} ({v})" for k, v in self.missing.items())
        return f"report written: {self.path} ({len(self.figures)} figures{todo})"


# ---------------------------------------------------------------- numbers

def lake_summary(con, lake: Lake) -> dict:
    """Pairs per source, ingest totals, quarantine reasons, scores per scorer, the curation run and whether
    it is older than the lake's inputs."""
    run = current_run(lake)
    rows = lambda sql: con.sql(sql).pl().to_dicts()  # noqa: E731
    return {
        "sources": rows("SELECT source, count(*) AS pairs FROM pairs GROUP BY 1 ORDER BY 2 DESC, 1"),
        "ingests": rows("SELECT count(*) AS files, coalesce(sum(n_read), 0) AS read, "
                        "coalesce(sum(n_accepted), 0) AS accepted, coalesce(sum(n_duplicates), 0) AS duplicates, "
                        "coalesce(sum(n_quarantined), 0) AS quarantined FROM ingests")[0],
        "quarantine": rows("SELECT reason, count(*) AS rows FROM quarantine GROUP BY 1 ORDER BY 2 DESC, 1"),
        "scorers": rows("SELECT scorer, count(*) AS scores, string_agg(DISTINCT scorer_version, ', ') AS versions "
                        "FROM scores GROUP BY 1 ORDER BY 1"),
        "run": run,
        "run_is_stale": run is not None and run["inputs"] != input_versions(lake),
    }


def scorer_agreement(con) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(voters, share, n): share[i, j] = fraction of the n[i, j] pairs both voters voted on where their votes
    are equal. Voters are the scorers (vote 1 / 0 / 0.5 from curation/labels/votes.py) and, last, `human`: the
    decisive human labels (label_0 ∈ {0, 1}; human ties are not votes)."""
    frame = con.sql("""
        WITH v AS (SELECT pair_id, scorer AS voter, vote FROM votes WHERE vote IS NOT NULL
                   UNION ALL
                   SELECT pair_id, 'human' AS voter, label_0 AS vote FROM pairs
                   WHERE label_0 IN (0, 1) AND pair_id IN (SELECT pair_id FROM votes))
        SELECT a.voter AS a, b.voter AS b, avg((a.vote = b.vote)::DOUBLE) AS share, count(*) AS n
        FROM v a JOIN v b USING (pair_id) GROUP BY ALL""").pl()
    voters = sorted(set(frame["a"].to_list()) - {"human"}) + (["human"] if "human" in frame["a"] else [])
    index = {name: i for i, name in enumerate(voters)}
    share = np.full((len(voters), len(voters)), np.nan)
    n = np.zeros((len(voters), len(voters)), dtype=np.int64)
    for row in frame.iter_rows(named=True):
        share[index[row["a"]], index[row["b"]]] = row["share"]
        n[index[row["a"]], index[row["b"]]] = row["n"]
    return voters, share, n


def source_agreement(con) -> pl.DataFrame:
    """Per source: share of decisive pairs with scorer votes where the human label equals the consensus
    (the same pairs as the curate line's "human agrees with consensus")."""
    return con.sql("""
        SELECT p.source, avg(c.human_agrees::DOUBLE) AS agreement, count(*) AS pairs
        FROM consensus c JOIN pairs p USING (pair_id)
        WHERE c.human_agrees IS NOT NULL AND c.n_scorers > 0 GROUP BY 1 ORDER BY 1""").pl()


def annotator_points(con) -> pl.DataFrame:
    """Per annotator: mean confidence c and stability v (pair_metrics) over their pairs that have them,
    with n_labels, reliability and minority_rate from the annotators table."""
    return con.sql("""
        SELECT a.user_id, a.n_labels, a.reliability, a.minority_rate, avg(m.confidence) AS mean_confidence,
               avg(m.stability) AS mean_stability
        FROM pair_metrics m JOIN pairs p USING (pair_id) JOIN annotators a ON a.user_id = p.user_id
        WHERE m.confidence IS NOT NULL AND m.stability IS NOT NULL AND a.reliability IS NOT NULL
              AND a.minority_rate IS NOT NULL
        GROUP BY ALL ORDER BY a.user_id""").pl()


def minority_counts(con, bins: int, threshold: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(edges, counts, n_above): the minority score over [0, 1] in `bins` equal bins (u = 1 falls in the
    last), and the number of pairs with u > threshold (the curate line's "minority pairs")."""
    frame = con.sql(f"""
        SELECT least(floor(minority_score * {bins}), {bins - 1})::INTEGER AS bin, count(*) AS n,
               count(*) FILTER (WHERE minority_score > {float(threshold)!r}) AS above
        FROM pair_metrics WHERE minority_score IS NOT NULL GROUP BY 1""").pl()
    counts = np.zeros(bins, dtype=np.int64)
    counts[frame["bin"].to_numpy()] = frame["n"].to_numpy()
    return np.linspace(0.0, 1.0, bins + 1), counts, int(frame["above"].sum())


def least_reliable(con, n: int, min_labels: int) -> pl.DataFrame:
    return con.sql(f"""
        SELECT user_id, n_labels, reliability, consensus_agreement, peer_agreement, left_rate, tie_rate,
               minority_rate
        FROM annotators WHERE n_labels >= {int(min_labels)} AND reliability IS NOT NULL
        ORDER BY reliability, user_id LIMIT {int(n)}""").pl()


def read_training_metrics(run_dir: str | os.PathLike) -> pl.DataFrame:
    """metrics.jsonl of a training run (training/trainer.py: one object per optimizer step), one row per step.
    A resumed run appends steps it already logged; the last record of a step wins."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl in the training run folder (training writes one "
                                f"line per optimizer step there)")
    records: dict[int, dict] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            records[int(record["step"])] = {k: float(record[k]) for k in ("loss", "implicit_acc")}
        except (ValueError, KeyError, TypeError) as exc:
            raise MetricsFileError(f"{path}:{number}: not a training metrics record with step, loss and "
                             f"implicit_acc ({type(exc).__name__}: {exc})") from None
    steps = sorted(records)
    return pl.DataFrame({"step": steps, "loss": [records[s]["loss"] for s in steps],
                         "implicit_acc": [records[s]["implicit_acc"] for s in steps]},
                        schema={"step": pl.Int64, "loss": pl.Float64, "implicit_acc": pl.Float64})


# ---------------------------------------------------------------- figures

def _figures(con, summary: dict, run_dir: str | os.PathLike | None, config: ReportConfig) -> list[ReportFigure]:
    run = summary["run"]
    no_run = "run `prefcurate curate` (no curation run yet)" if run is None else None
    no_votes = None if run is None or run["counts"]["pairs_with_votes"] else \
        "run `prefcurate score`, then `prefcurate curate` (the curation run has no scorer votes)"
    needs = no_run or no_votes
    threshold = float(run["counts"]["minority_threshold"]) if run else MINORITY_THRESHOLD
    figures = [_annotator_figure(con, needs, threshold), _minority_figure(con, needs, threshold, config),
               _agreement_figure(con, needs), _source_figure(con, needs)]
    if run_dir is not None:
        figures.append(_training_figure(run_dir))
        validation = validation_figure(run_dir)
        if validation is not None:
            figures.append(validation)
    return figures


def _annotator_figure(con, needs: str | None, threshold: float) -> ReportFigure:
    fig = ReportFigure("annotator-scatter", "Annotators: confidence against minority rate",
                       "Scatter plot, one point per annotator: mean confidence of the scorers toward their labels "
                       "on the x axis, share of their labels that are minority pairs on the y axis, point size "
                       "by number of labels, colour by reliability.",
                       "Upper left: the scorers confidently and consistently reject the annotator's labels "
                       "(Adaptive-DPO's minority region, u = (1 − c)·v); the five least reliable are named.",
                       needs=needs)
    if fig.needs is not None:
        return fig
    points = annotator_points(con)
    if not points.height:
        fig.needs = "ingest labelled pairs with images, then score and curate (no annotator has scored pairs)"
        return fig
    fig.png = plots.annotator_scatter(
        points["mean_confidence"].to_numpy(), points["minority_rate"].to_numpy(),
        points["n_labels"].to_numpy(), points["reliability"].to_numpy(), points["user_id"].to_list(),
        threshold)
    stability = points["mean_stability"]
    fig.caption += (f" Mean stability v per annotator ranges {stability.min():.2f}–{stability.max():.2f} "
                    "(v is capped at 1).")
    fig.values = {"annotators": points.height,
                  "mean_confidence": dict(zip(points["user_id"], points["mean_confidence"].round(6))),
                  "minority_rate": dict(zip(points["user_id"], points["minority_rate"].round(6)))}
    return fig


def _minority_figure(con, needs: str | None, threshold: float, config: ReportConfig) -> ReportFigure:
    fig = ReportFigure("minority-histogram", "Minority score of the pairs",
                       f"Histogram of the pairs' minority scores from 0 to 1, threshold {threshold:g} marked.",
                       "u = (1 − c)·v is high when the scorers consistently prefer the image the human rejected; "
                       "pairs right of the line are counted as minority pairs.", needs=needs)
    if fig.needs is None:
        edges, counts, n_above = minority_counts(con, config.histogram_bins, threshold)
        fig.png = plots.minority_histogram(edges, counts, threshold, n_above)
        fig.values = {"counts": counts.tolist(), "threshold": threshold, "above_threshold": n_above}
    return fig


def _agreement_figure(con, needs: str | None) -> ReportFigure:
    fig = ReportFigure("scorer-agreement", "Scorer agreement",
                       "Heatmap of the share of common pairs on which two voters vote the same; the voters are "
                       "the scorers and the human label, each cell printed.",
                       "Each row/column is a scorer, plus `human` (decisive human labels). A scorer far from all "
                       "others, or near 0.5 with the human, adds noise to the consensus.",
                       needs=needs)
    if fig.needs is None:
        voters, share, n = scorer_agreement(con)
        fig.png = plots.agreement_heatmap(voters, share, n)
        fig.values = {"voters": voters, "share": [[None if np.isnan(x) else round(float(x), 6) for x in row]
                                                   for row in share], "pairs": n.tolist()}
    return fig


def _source_figure(con, needs: str | None) -> ReportFigure:
    fig = ReportFigure("source-agreement", "Human and consensus agreement per source",
                       "Horizontal bar chart: per source, the share of decisive pairs where the human label "
                       "equals the scorers' consensus.",
                       "0.5 is chance. A source far below the others has noisier labels or a different taste.",
                       needs=needs)
    if fig.needs is not None:
        return fig
    per_source = source_agreement(con)
    if not per_source.height:
        fig.needs = "no decisive human label meets a scorer consensus yet: ingest labelled pairs, score, curate"
        return fig
    fig.png = plots.source_agreement_bars(per_source["source"].to_list(), per_source["agreement"].to_numpy(),
                                          per_source["pairs"].to_numpy())
    fig.values = {row["source"]: {"agreement": round(row["agreement"], 6), "pairs": row["pairs"]}
                  for row in per_source.iter_rows(named=True)}
    return fig


def _training_figure(run_dir: str | os.PathLike) -> ReportFigure:
    metrics = read_training_metrics(run_dir)
    name = Path(run_dir).resolve().name
    fig = ReportFigure("training-curves", f"Training: {name}",
                       "Two line plots over optimizer steps: the training loss and the implicit accuracy.",
                       f"From {Path(run_dir) / 'metrics.jsonl'}. Implicit accuracy: share of pairs whose "
                       "implicit reward prefers the winner (ties count half); 0.5 is chance.",
                       needs=None if metrics.height else "the run has no optimizer step in metrics.jsonl yet")
    if metrics.height:
        fig.png = plots.training_curves(metrics["step"].to_numpy(), metrics["loss"].to_numpy(),
                                        metrics["implicit_acc"].to_numpy(), name)
        fig.values = {"steps": metrics.height, "last_step": int(metrics["step"][-1]),
                      "last_loss": float(metrics["loss"][-1]),
                      "last_implicit_acc": float(metrics["implicit_acc"][-1])}
    return fig


def validation_figure(run_dir: str | os.PathLike, cell: int = 160) -> ReportFigure | None:
    """The run's newest validation images (training/tracking.py writes ``validation/step-N/NN.png`` and
    ``prompts.json``) side by side, each scaled to ``cell`` px; None when the run rendered none."""
    from PIL import Image

    done = sorted(p for p in (Path(run_dir) / "validation").glob("step-*[0-9]") if (p / "prompts.json").is_file())
    if not done:
        return None
    prompts = json.loads((done[-1] / "prompts.json").read_text())
    strip = Image.new("RGB", (cell * len(prompts), cell), "white")
    for i in range(len(prompts)):
        with Image.open(done[-1] / f"{i:02d}.png") as im:
            strip.paste(im.convert("RGB").resize((cell, cell), Image.NEAREST), (i * cell, 0))
    buf = io.BytesIO()
    strip.save(buf, format="PNG")
    step = int(done[-1].name.split("-")[1])
    return ReportFigure("validation-images", f"Validation images at step {step}",
                        f"{len(prompts)} images generated by the fine-tuned model, left to right: "
                        + "; ".join(prompts),
                        f"From {done[-1]}: one fixed seed per prompt, so runs and steps compare image by image.",
                        png=buf.getvalue(), values={"step": step, "prompts": prompts})


# ---------------------------------------------------------------- HTML

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 980px; margin: 24px auto; padding: 0 16px; color: #222; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; }
th { text-align: left; background: #f4f6f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.summary { display: flex; flex-wrap: wrap; gap: 24px; } .summary > div { min-width: 200px; }
figure { margin: 16px 0 28px; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; max-width: 760px; }
.missing, .stale { background: #fff6e0; border-left: 4px solid #e0a800; padding: 8px 12px; margin: 12px 0; }
code { background: #f1f1f1; padding: 0 3px; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[dict], columns: list[str], table_id: str = "") -> str:
    if not rows:
        return "<p>none</p>"
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = ""
    for row in rows:
        cells = []
        for c in columns:
            v = row[c]
            text = "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
            cells.append(f'<td class="num">{_e(text)}</td>' if isinstance(v, int | float) else f"<td>{_e(text)}</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    id_attribute = f' id="{table_id}"' if table_id else ""
    return f"<table{id_attribute}><tr>{head}</tr>{body}</table>"


def _code(text: str) -> str:
    """`command` spans of a message as <code>."""
    parts = _e(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _summary_html(lake: Lake, summary: dict) -> str:
    ingests, run = summary["ingests"], summary["run"]
    total = sum(s["pairs"] for s in summary["sources"])
    parts = [f'<section id="lake-summary" data-pairs="{total}"><h2>Lake</h2><p><code>{_e(lake.root)}</code>: '
             f"<b>{total}</b> pairs from {len(summary['sources'])} source(s); {ingests['files']} ingested file(s): "
             f"{ingests['read']} rows read = {ingests['accepted']} accepted + {ingests['duplicates']} duplicates + "
             f"{ingests['quarantined']} quarantined.</p><div class='summary'>",
             "<div><h3>Pairs per source</h3>" + _table(summary["sources"], ["source", "pairs"]) + "</div>",
             "<div><h3>Quarantine by reason</h3>" + _table(summary["quarantine"], ["reason", "rows"],
                                                           "quarantine-reasons") + "</div>",
             "<div><h3>Scorers</h3>" + (_table(summary["scorers"], ["scorer", "scores", "versions"]) if
                                        summary["scorers"] else _code("no scores yet: run `prefcurate score`"))
             + "</div></div>"]
    if total == 0:
        parts.append('<div class="missing" data-needs="ingest">' + _code(
            "The lake has no pairs: run `prefcurate ingest` first.") + "</div>")
    if run is None:
        parts.append('<p id="curation-run">' + _code("No curation run yet: run `prefcurate curate`.") + "</p>")
    else:
        c = run["counts"]
        agreement = "no scorer votes" if c["human_agreement"] is None else \
            f"human agrees with consensus on {c['human_agreement']:.1%} of decisive pairs"
        parts.append(f'<p id="curation-run" data-run-id="{_e(run["run_id"])}">Curation run <code>'
                     f"{_e(run['run_id'])}</code>: {c['pairs']} pairs ({c['pairs_with_votes']} with scorer votes from "
                     f"{c['scorers']} scorers: {_e(', '.join(run.get('scorers', [])))}), {c['annotators']} "
                     f"annotators, {agreement}, {c['minority_pairs']} minority pairs (u &gt; "
                     f"{c['minority_threshold']}).</p>")
        if summary["run_is_stale"]:
            parts.append('<div class="stale" data-needs="curate">' + _code(
                "The lake has new ingests or scores since this curation run: run `prefcurate curate` to "
                "bring the figures up to date.") + "</div>")
    return "".join(parts) + "</section>"


def _figure_html(fig: ReportFigure) -> str:
    if fig.png is None:
        return (f'<h2>{_e(fig.title)}</h2><div class="missing" id="{fig.id}-missing" data-needs="{_e(fig.needs)}">'
                f"Not drawn: {_code(fig.needs or '')}.</div>")
    data = base64.b64encode(fig.png).decode("ascii")
    return (f'<h2>{_e(fig.title)}</h2><figure id="{fig.id}" data-values="{_e(json.dumps(fig.values))}">'
            f'<img src="data:image/png;base64,{data}" alt="{_e(fig.alt)}">'
            f"<figcaption>{_code(fig.caption)}</figcaption></figure>")


def render_report(lake: Lake, run_dir: str | os.PathLike | None = None,
                  config: ReportConfig = ReportConfig()) -> tuple[str, list[ReportFigure]]:
    """The report page as one HTML string, and its figures (drawn or not)."""
    con = connect(lake)
    try:
        summary = lake_summary(con, lake)
        figures = _figures(con, summary, run_dir, config)
        table = least_reliable(con, config.least_reliable, config.min_labels).to_dicts() \
            if summary["run"] is not None else None
    finally:
        con.close()
    columns = ["user_id", "n_labels", "reliability", "consensus_agreement", "peer_agreement", "left_rate",
               "tie_rate", "minority_rate"]
    annotators = (f'<h2>The {config.least_reliable} least reliable annotators</h2><section id="least-reliable">'
                  f"<p>Annotators with at least {config.min_labels} labels, lowest reliability first.</p>"
                  f"{_table(table, columns, 'least-reliable-table')}</section>" if table is not None else
                  '<h2>Least reliable annotators</h2><div class="missing" id="least-reliable-missing" '
                  'data-needs="run `prefcurate curate`">' + _code("Not computed: run `prefcurate curate`.") + "</div>")
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>prefcurate report: '
            f"{_e(lake.root)}</title><style>{STYLE}</style></head><body><h1>prefcurate report</h1>"
            f"<p>Generated {generated}.</p>{_summary_html(lake, summary)}"
            + "".join(_figure_html(f) for f in figures) + annotators + "</body></html>\n")
    return page, figures


def write_report(lake: Lake | str, out: str | os.PathLike, run_dir: str | os.PathLike | None = None,
                 config: ReportConfig = ReportConfig()) -> ReportResult:
    """Render the report of `lake` (and of the training run in `run_dir`) to the file `out`, atomically."""
    lake = lake if isinstance(lake, Lake) else Lake(lake)
    page, figures = render_report(lake, run_dir, config)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, out)
    return ReportResult(out, [f.id for f in figures if f.png is not None],
                        {f.id: f.needs for f in figures if f.png is None})
