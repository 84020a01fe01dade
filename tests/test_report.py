"""`prefcurate report` on a small curated lake: the numbers behind each figure, stage-by-stage degradation,
the CLI, and the page as a real headless Chromium renders it (skipped only when chromium is not installed)."""
from __future__ import annotations

import glob
import json
import math
import os
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import polars as pl
import pytest
from PIL import Image

from prefcurate.curation.labels.curate import current_run, curate
from prefcurate.curation.ingest import IngestConfig, ingest_file, make_reader
from prefcurate.curation.store.lake import Lake
from prefcurate.curation.report.page import read_training_metrics, write_report
from prefcurate.curation.synthetic.sample import SampleConfig, generate_sample
from prefcurate.curation.scorers.runner import run_scoring
from prefcurate.cli.main import main
from prefcurate.data_schemas.vocab import WEIGHT_FREE_SCORERS


PIXEL_SCORERS = list(WEIGHT_FREE_SCORERS)
FIGURES = ("annotator-scatter", "minority-histogram", "scorer-agreement", "source-agreement", "training-curves")
TRAIN_STEPS = 30


class _Elements(HTMLParser):
    """Every start tag of a page as (tag, attributes)."""

    def __init__(self, page: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def by_id(self) -> dict[str, tuple[str, dict]]:
        return {a["id"]: (t, a) for t, a in self.elements if "id" in a}


def _ingest(lake: Lake, shard: str, source: str) -> None:
    ingest_file(lake, shard, IngestConfig(source, "pickapic"), make_reader("pickapic"))


def _write_metrics(run_dir) -> list[dict]:
    """metrics.jsonl exactly as training/trainer.py writes it (loss and metric means, then step, lr,
    elapsed_s, pairs), including a resume that re-logs steps 20-21: the later records must win."""
    os.makedirs(run_dir, exist_ok=True)
    records = [{"loss": math.log(2) - 0.01 * s, "implicit_acc": min(1.0, 0.5 + 0.015 * s), "reward_margin": 0.02 * s,
                "weight_mean": 1.0, "margin_mean": 0.0, "step": s, "lr": 1e-5, "elapsed_s": 0.1 * s, "pairs": 4}
               for s in range(1, 22)]
    records += [dict(r, loss=r["loss"] - 0.001) for r in records[19:21]]  # resumed from the step-19 checkpoint
    records += [{"loss": math.log(2) - 0.01 * s, "implicit_acc": min(1.0, 0.5 + 0.015 * s), "reward_margin": 0.0,
                 "weight_mean": 1.0, "margin_mean": 0.0, "step": s, "lr": 1e-5, "elapsed_s": 0.1 * s, "pairs": 4}
                for s in range(22, TRAIN_STEPS + 1)]
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records


@pytest.fixture(scope="module")
def curated(tmp_path_factory):
    """The small sample's two shards ingested as two sources, scored by the pixel scorers, curated; a run dir."""
    root = tmp_path_factory.mktemp("report")
    paths = generate_sample(str(root / "sample"), SampleConfig.small())
    shards = sorted(glob.glob(os.path.join(paths.pickapic_dir, "*.parquet")))
    lake = Lake(str(root / "lake"), create=True)
    _ingest(lake, shards[0], "pickapic")
    _ingest(lake, shards[1], "pickapic_late")
    run_scoring(lake, PIXEL_SCORERS, workers=0)
    curate(lake)
    _write_metrics(root / "run-dpo")
    report = write_report(lake, root / "out" / "report.html", run_dir=root / "run-dpo")
    return {"lake": lake, "root": root, "report": report, "page": report.path.read_text()}


def _values(page: str, figure_id: str) -> dict:
    tag, attrs = _Elements(page).by_id()[figure_id]
    assert tag == "figure"
    return json.loads(attrs["data-values"])


def _run_tables(lake: Lake) -> dict[str, pl.DataFrame]:
    run_id = current_run(lake)["run_id"]
    return {name: pl.read_parquet(lake.local_path("curation", run_id, f"{name}.parquet"))
            for name in ("votes", "consensus", "pair_metrics", "annotators")}


def test_every_figure_is_drawn_with_alt_text_and_nothing_external(curated):
    assert curated["report"].figures == list(FIGURES) and curated["report"].missing == {}
    elements = _Elements(curated["page"]).elements
    images = [a for t, a in elements if t == "img"]
    assert len(images) == len(FIGURES)
    assert all(a["src"].startswith("data:image/png;base64,") and len(a["alt"]) > 40 for a in images)
    # self-contained: no link, script or stylesheet that would need the network
    assert not [a for t, a in elements if t in ("script", "link") or "href" in a]


def test_figures_carry_the_numbers_the_curation_run_computed(curated):
    lake, page = curated["lake"], curated["page"]
    run, tables = current_run(lake), _run_tables(lake)
    pairs = pl.from_arrow(lake.read("pairs", columns=["pair_id", "source", "label_0"]))

    by_source = _values(page, "source-agreement")
    assert set(by_source) == {"pickapic", "pickapic_late"}
    decided = tables["consensus"].filter(pl.col("human_agrees").is_not_null() & (pl.col("n_scorers") > 0))
    assert sum(v["pairs"] for v in by_source.values()) == decided.height
    overall = sum(v["agreement"] * v["pairs"] for v in by_source.values()) / decided.height
    assert overall == pytest.approx(run["counts"]["human_agreement"], abs=1e-5)  # curate's own figure

    histogram = _values(page, "minority-histogram")
    assert sum(histogram["counts"]) == tables["pair_metrics"]["minority_score"].is_not_null().sum()
    assert histogram["above_threshold"] == run["counts"]["minority_pairs"]

    agreement = _values(page, "scorer-agreement")
    assert agreement["voters"] == sorted(PIXEL_SCORERS) + ["human"]
    share = np.array(agreement["share"], dtype=float)
    assert np.allclose(np.diag(share), 1.0) and np.allclose(share, share.T)
    wide = tables["votes"].pivot(on="scorer", index="pair_id", values="vote").join(pairs, on="pair_id")
    both = wide.filter(pl.col("sharpness").is_not_null() & pl.col("exposure").is_not_null())
    i, j = agreement["voters"].index("sharpness"), agreement["voters"].index("exposure")
    assert share[i, j] == pytest.approx((both["sharpness"] == both["exposure"]).mean(), abs=1e-6)
    decisive = wide.filter(pl.col("label_0").is_in([0.0, 1.0]) & pl.col("prompt_colour").is_not_null())
    h, k = agreement["voters"].index("human"), agreement["voters"].index("prompt_colour")
    assert share[h, k] == pytest.approx((decisive["label_0"] == decisive["prompt_colour"]).mean(), abs=1e-6)
    assert agreement["pairs"][h][k] == decisive.height

    scatter = _values(page, "annotator-scatter")
    annotators = tables["annotators"]
    rated = annotators.filter(pl.col("minority_rate").is_not_null())
    assert scatter["annotators"] == rated.height
    assert scatter["minority_rate"] == pytest.approx(dict(zip(rated["user_id"], rated["minority_rate"])), abs=1e-6)


def test_least_reliable_table_lists_the_twenty_lowest_with_enough_labels(curated):
    table = curated["page"].split('id="least-reliable-table"')[1].split("</table>")[0]
    first_cells = [row.split("<td>")[1].split("</td>")[0] for row in table.split("<tr>")[2:]]
    eligible = _run_tables(curated["lake"])["annotators"].filter(pl.col("n_labels") >= 10)
    assert eligible.height > 20  # so the cut at 20 is exercised
    assert first_cells == eligible.sort(["reliability", "user_id"]).head(20)["user_id"].to_list()


def test_training_metrics_last_record_of_a_step_wins(curated):
    records = _write_metrics(curated["root"] / "run-check")
    metrics = read_training_metrics(curated["root"] / "run-check")
    assert metrics["step"].to_list() == list(range(1, TRAIN_STEPS + 1))
    assert metrics.filter(pl.col("step") == 20)["loss"].item() == pytest.approx(records[21]["loss"])
    values = _values(curated["page"], "training-curves")
    assert values["steps"] == TRAIN_STEPS and values["last_loss"] == pytest.approx(math.log(2) - 0.01 * TRAIN_STEPS)


def test_each_missing_stage_is_named_instead_of_plotted(tmp_path):
    paths = generate_sample(str(tmp_path / "sample"), SampleConfig.small())
    lake = Lake(str(tmp_path / "lake"), create=True)

    def needs(page: str) -> dict[str, str]:
        return {a["id"]: a["data-needs"] for t, a in _Elements(page).elements if "missing" in a.get("class", "")
                and "id" in a}

    empty = write_report(lake, tmp_path / "empty.html")
    page = empty.path.read_text()
    assert empty.figures == [] and 'data-needs="ingest"' in page
    assert set(needs(page)) == {f"{f}-missing" for f in FIGURES[:4]} | {"least-reliable-missing"}
    assert all("prefcurate curate" in n for n in needs(page).values())

    _ingest(lake, str(paths.shards[0]), "pickapic")
    curate(lake)  # no scores: a run without scorer votes
    page = write_report(lake, tmp_path / "unscored.html").path.read_text()
    assert all("prefcurate score" in needs(page)[f"{f}-missing"] for f in FIGURES[:4])
    assert 'id="least-reliable-table"' in page and 'class="stale"' not in page

    run_scoring(lake, ["sharpness"], workers=0)  # new scores, not curated yet
    assert 'class="stale"' in write_report(lake, tmp_path / "stale.html").path.read_text()


def test_cli_report_writes_the_page_and_refuses_bad_runs(curated, tmp_path, capsys):
    lake = curated["lake"].root
    out = tmp_path / "cli.html"
    assert main(["report", "--lake", lake, "--run", str(curated["root"] / "run-dpo"), "--out", str(out)]) == 0
    assert "report written" in capsys.readouterr().out and out.stat().st_size > 50_000
    assert main(["report", "--lake", lake, "--run", str(tmp_path), "--out", str(out)]) == 3
    assert "metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.69}\n')
    assert main(["report", "--lake", lake, "--run", str(tmp_path), "--out", str(out)]) == 3
    assert "metrics.jsonl:1" in capsys.readouterr().err


# Marks each image with its decoded size once the page has loaded (the report itself has no script).
PROBE = """<script>window.addEventListener("load", () => {
  for (const img of document.images) { img.dataset.naturalWidth = img.naturalWidth; }
  document.body.dataset.probed = "yes";
});</script>"""


def _chromium(*args: str, user_dir) -> str:
    command = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={user_dir}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=90, check=True).stdout


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (Debian: apt-get install -y chromium); .ci/run installs it")
def test_headless_chromium_renders_every_figure(curated, tmp_path):
    probed = tmp_path / "probed.html"
    probed.write_text(curated["page"].replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=5000", "--dump-dom", probed.as_uri(), user_dir=tmp_path / "profile")
    rendered = _Elements(dom)
    assert any(t == "body" and a.get("data-probed") == "yes" for t, a in rendered.elements), dom[:500]
    by_id = rendered.by_id()
    for figure_id in FIGURES:
        assert by_id[figure_id][0] == "figure"
    widths = [int(a["data-natural-width"]) for t, a in rendered.elements if t == "img"]
    assert len(widths) == len(FIGURES) and min(widths) >= 400, widths  # every PNG decoded at full size

    shot = tmp_path / "page.png"
    _chromium("--window-size=1200,3000", f"--screenshot={shot}", curated["report"].path.as_uri(),
              user_dir=tmp_path / "profile")
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape == (3000, 1200, 3)
    not_white = (pixels < 235).any(axis=2).mean()
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert not_white > 0.05 and colours > 200, (not_white, colours)  # plots drawn, not a blank page
