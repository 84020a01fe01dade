"""The HPDv2, generic JSONL/CSV and WMT readers, each ingested end to end into a real lake.

Small files are written in the real shapes, with real tiny PNGs; expected counts, labels and
ids are worked out by hand (or, for the real WMT13 CSVs, recomputed here with the csv module).
"""
from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import os
import signal
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from prefcurate.curation.store import ids
from prefcurate.curation.ingest import (
    IngestConfig, UnreadableSourceError, ingest_file, make_reader, quarantine_reasons,
)
from prefcurate.curation.store.lake import Lake
from prefcurate.data_schemas import TABLES
from tests.shared_data import shared_data


WMT_TRAIN = "wmt13_fr-en_rankings_train.csv"  # in ../shared/data (no licence to ship them here)
WMT_TEST = "wmt13_fr-en_rankings_test.csv"


def png(rgb: tuple[int, int, int]) -> bytes:
    """A real 8x8 PNG of one colour: distinct colours give distinct bytes (distinct content ids)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def ingest(lake_dir: Path, path: Path, source: str, fmt: str, **options):
    lake = Lake(str(lake_dir), create=True)
    result = ingest_file(lake, str(path), IngestConfig(source=source, format=fmt), make_reader(fmt, **options))
    result.check()
    return lake, result


def pairs_by_id(lake: Lake) -> dict[str, dict]:
    return {row["pair_id"]: row for row in lake.read("pairs").to_pylist()}


def assert_nothing_written(lake: Lake) -> None:
    for table in TABLES:
        assert lake.files(table) == [], table
    assert not lake.fs.exists(lake.local_path("_staging")) or lake.fs.ls(lake.local_path("_staging")) == []


# -- HPDv2 -------------------------------------------------------------------------------------

@pytest.fixture
def hpd_images(tmp_path: Path) -> dict[str, bytes]:
    """Five distinct PNGs and one corrupt file under tmp/hpd/train/."""
    folder = tmp_path / "hpd" / "train"
    folder.mkdir(parents=True)
    images = {f"train/{name}.png": png(rgb) for name, rgb in
              zip("abcde", [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)])}
    images["train/bad.png"] = b"\x89PNG\r\n\x1a\n but not really"
    for rel, data in images.items():
        (tmp_path / "hpd" / rel).write_bytes(data)
    return images


def test_hpdv2_train(tmp_path, hpd_images):
    entries = [
        {"human_preference": [0, 1], "prompt": "a red cube", "file_path": ["train/a.png", "train/b.png"]},
        {"human_preference": [1, 0, 0], "prompt": "a blue ball", "file_path": ["train/c.png", "train/d.png",
                                                                               "train/e.png"]},
        {"human_preference": [1, 0], "prompt": "gone", "file_path": ["train/a.png", "train/missing.png"]},
        {"human_preference": [0, 0], "prompt": "no choice", "file_path": ["train/a.png", "train/b.png"]},
        {"human_preference": [1, 0], "prompt": "short", "file_path": ["train/a.png"]},
        {"human_preference": [1, 0], "prompt": "broken", "file_path": ["train/bad.png", "train/a.png"]},
        {"human_preference": [1, 0], "prompt": "same", "file_path": ["train/a.png", "train/a.png"]},
    ]
    path = tmp_path / "hpd" / "train.json"
    path.write_text(json.dumps(entries))
    lake, result = ingest(tmp_path / "lake", path, "hpdv2", "hpdv2")
    # 1 + 2 + 1 pairs, and one problem row each for entries 3 and 4: 7 + the identical pair = 8 rows.
    assert (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined) == (8, 3, 0, 5)
    assert quarantine_reasons(lake) == {"missing_image_file": 1, "unlabelled": 1, "malformed_entry": 1,
                                        "corrupt_image": 1, "identical_images": 1}
    assert result.n_images_new == 5  # a..e; bad.png never reaches the images table
    pairs = pairs_by_id(lake)
    first = pairs[ids.pair_id("hpdv2", "0:train/a.png:train/b.png")]
    assert first["label_0"] == 0.0  # b (image_1) preferred
    assert first["image_0_id"] == ids.content_id(hpd_images["train/a.png"])
    assert first["image_1_uid"] == "train/b.png"
    assert first["user_id"] is None and first["split"] == "train" and first["ranking_id"] == "train.json:0"
    for other in ("d", "e"):  # c preferred over both, listed first: label_0 = 1
        assert pairs[ids.pair_id("hpdv2", f"1:train/c.png:train/{other}.png")]["label_0"] == 1.0
    quarantine = {q["reason"]: q for q in lake.read("quarantine").to_pylist()}
    assert str(tmp_path / "hpd" / "train" / "missing.png") in quarantine["missing_image_file"]["detail"]
    assert quarantine["unlabelled"]["row_identity"] == "3"
    refs = {r["ref_id"]: r["image_id"] for r in lake.read("image_refs").to_pylist()}
    assert refs["hpdv2:train/e.png"] == ids.content_id(hpd_images["train/e.png"])


def test_hpdv2_test_split_annotators_ties_and_reingest(tmp_path):
    root = tmp_path / "images"
    (root / "test").mkdir(parents=True)
    for k in range(7):
        (root / "test" / f"{k}.png").write_bytes(png((30 * k, 10, 200)))
    p = [f"test/{k}.png" for k in range(7)]
    entries = [
        {"prompt": "a castle", "image_path": p[:3], "rank": [1, 2, 3],
         "raw_annotations": [{"rank": [1, 2, 2], "user_hash": "u1"}, {"rank": [3, 1, 2], "user_hash": "u2"}]},
        {"prompt": "a boat", "image_path": p[3:5], "rank": [2, 1], "raw_annotations": []},
        {"prompt": "a tree", "image_path": p[:3], "rank": [1, 2, 3],
         "raw_annotations": [{"rank": [1, 2], "user_hash": "u1"}, {"rank": ["x", 1, 2], "user_hash": "u3"}]},
    ]
    (tmp_path / "ann").mkdir()
    path = tmp_path / "ann" / "test.json"
    path.write_text(json.dumps(entries))
    lake, result = ingest(tmp_path / "lake", path, "hpdv2", "hpdv2", image_root=str(root))
    assert (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined) == (9, 7, 0, 2)
    assert quarantine_reasons(lake) == {"malformed_entry": 1, "wrong_type": 1}
    pairs = pairs_by_id(lake)
    expected = {  # identity -> (label_0, user_id)
        "0:0:u1:test/0.png:test/1.png": (1.0, "u1"), "0:0:u1:test/0.png:test/2.png": (1.0, "u1"),
        "0:0:u1:test/1.png:test/2.png": (0.5, "u1"),
        "0:1:u2:test/0.png:test/1.png": (0.0, "u2"), "0:1:u2:test/0.png:test/2.png": (0.0, "u2"),
        "0:1:u2:test/1.png:test/2.png": (1.0, "u2"),
        "1:avg:test/3.png:test/4.png": (0.0, None),  # averaged rank, no annotator
    }
    assert {ids.pair_id("hpdv2", k): v for k, v in expected.items()} == \
        {pid: (row["label_0"], row["user_id"]) for pid, row in pairs.items()}
    assert {row["split"] for row in pairs.values()} == {"test"}
    assert sum(row["label_0"] == 0.5 for row in pairs.values()) == 1

    # A later release of the file with one more entry: the old pairs are duplicates.
    entries.append({"prompt": "a kite", "image_path": p[5:7], "rank": [1, 2],
                    "raw_annotations": [{"rank": [2, 1], "user_hash": "u9"}]})
    (tmp_path / "ann2").mkdir()
    path2 = tmp_path / "ann2" / "test.json"
    path2.write_text(json.dumps(entries))
    lake, again = ingest(tmp_path / "lake", path2, "hpdv2", "hpdv2", image_root=str(root))
    assert (again.n_read, again.n_accepted, again.n_duplicates, again.n_quarantined) == (10, 1, 7, 2)
    kite = pairs_by_id(lake)[ids.pair_id("hpdv2", "3:0:u9:test/5.png:test/6.png")]
    assert (kite["label_0"], kite["user_id"]) == (0.0, "u9")


@pytest.mark.parametrize("content, what", [
    ({"prompt": "not a list"}, "top level is a dict"),
    ([{"caption": "x", "images": []}], "first entry has"),
    ("[{\"prompt\": ", "not a JSON file"),
])
def test_hpdv2_unreadable_writes_nothing(tmp_path, content, what):
    path = tmp_path / "train.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    lake = Lake(str(tmp_path / "lake"), create=True)
    with pytest.raises(UnreadableSourceError, match=what):
        ingest_file(lake, str(path), IngestConfig("hpdv2", "hpdv2"), make_reader("hpdv2"))
    assert_nothing_written(lake)


# -- generic JSONL / CSV -------------------------------------------------------------------------

def test_jsonl_paths_base64_and_problems(tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    images = [png((200, 0, 0)), png((0, 200, 0)), png((0, 0, 200))]
    for k, data in enumerate(images):
        (folder / f"p{k}.png").write_bytes(data)
    b64 = [base64.b64encode(d).decode() for d in images]
    lines = [
        json.dumps({"prompt": "cat", "image_0": "p0.png", "image_1": "p1.png", "label": 1, "annotator": "ann1",
                    "created_at": "2024-05-01T12:00:00Z", "model_0": "sd15", "model_1": "sdxl"}),
        json.dumps({"prompt": "dog", "image_0": f"data:image/png;base64,{b64[2]}", "image_1": f"base64:{b64[0]}",
                    "label": "tie", "annotator": 7}),
        '{"prompt": "broken", "image_0": ',
        "",
        json.dumps({"prompt": "cat", "image_0": "p1.png", "image_1": "p2.png", "label": "Right", "id": "r5"}),
        json.dumps({"prompt": "cat", "image_0": "p1.png", "image_1": "p2.png", "label": "maybe"}),
        json.dumps({"prompt": "cow", "image_0": "nope.png", "image_1": "p2.png", "label": 0}),
        json.dumps({"prompt": "again", "image_0": "p1.png", "image_1": "p2.png", "label": 0, "id": "r5"}),
        json.dumps({"prompt": "eel", "image_0": "base64:!!not base64!!", "image_1": "p0.png", "label": 1}),
        json.dumps({"prompt": "fox", "image_0_id": "img-9", "image_1_id": "img-10", "label": "left"}),
        json.dumps({"prompt": "owl", "image_0": "p0.png", "image_1": "p1.png", "label": 1.5}),
        "[1, 2]",
    ]
    path = folder / "prefs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    lake, result = ingest(tmp_path / "lake", path, "gen", "jsonl")
    # 12 lines, 1 blank: 11 rows = 4 accepted (lines 1, 2, 5, 10) + 1 duplicate (line 8) + 6 quarantined.
    assert (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined) == (11, 4, 1, 6)
    assert quarantine_reasons(lake) == {"malformed_json": 2, "wrong_type": 1, "missing_image_file": 1,
                                        "corrupt_image": 1, "label_out_of_range": 1}
    assert result.n_images_new == 3
    pairs = pairs_by_id(lake)
    first = pairs[ids.pair_id("gen", "1:p0.png:p1.png")]
    assert (first["label_0"], first["user_id"], first["model_0"], first["model_1"]) == (1.0, "ann1", "sd15", "sdxl")
    assert first["created_at"].isoformat() == "2024-05-01T12:00:00+00:00"
    assert first["image_0_id"] == ids.content_id(images[0])
    b64_ref = lambda s: "b64:" + ids.content_id(s.encode())  # noqa: E731
    tie = pairs[ids.pair_id("gen", f"2:{b64_ref('data:image/png;base64,' + b64[2])}:{b64_ref('base64:' + b64[0])}")]
    assert (tie["label_0"], tie["user_id"]) == (0.5, "7")
    assert (tie["image_0_id"], tie["image_1_id"]) == (ids.content_id(images[2]), ids.content_id(images[0]))
    assert pairs[ids.pair_id("gen", "r5")]["label_0"] == 0.0  # "Right": image_1 preferred
    fox = pairs[ids.pair_id("gen", "10:img-9:img-10")]
    assert (fox["label_0"], fox["image_0_id"], fox["image_1_id"]) == (1.0, "gen:img-9", "gen:img-10")
    quarantine = lake.read("quarantine").to_pylist()
    assert sorted(q["row_identity"] for q in quarantine if q["reason"] == "malformed_json") == ["12", "3"]
    assert [q["detail"] for q in quarantine if q["reason"] == "wrong_type"] == ["label 'maybe' is not a number"]


def contained_inputs_case(tmp_path: Path) -> tuple[Path, Path, dict]:
    """A root with two images, a folder, a FIFO, a too-big file and symlinks; an image outside it.
    Returns (root, jsonl path, expected reason per line number)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "p0.png").write_bytes(png((1, 2, 3)))
    (root / "p1.png").write_bytes(png((4, 5, 6)))
    (root / "big.png").write_bytes(png((7, 8, 9)) + b"\0" * 4000)
    (outside / "o.png").write_bytes(png((9, 9, 9)))
    (root / "escape.png").symlink_to(outside / "o.png")  # a link inside the root that points out
    (root / "alias.png").symlink_to(root / "p1.png")     # a link that stays inside: fine
    os.mkfifo(root / "fifo.png")
    cases = [("p0.png", "p1.png", None), (str(outside / "o.png"), "p1.png", "image_outside_root"),
             ("../outside/o.png", "p1.png", "image_outside_root"), ("sub/../../outside/o.png", "p0.png",
                                                                    "image_outside_root"),
             ("escape.png", "p0.png", "image_outside_root"), ("alias.png", "p0.png", None),
             ("/dev/zero", "p0.png", "image_outside_root"), ("fifo.png", "p0.png", "not_a_regular_file"),
             ("sub", "p0.png", "not_a_regular_file"), ("big.png", "p0.png", "image_too_large"),
             ("nope.png", "p0.png", "missing_image_file")]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"case {n}", "image_0": a, "image_1": b, "label": 1}) + "\n"
                            for n, (a, b, _) in enumerate(cases, start=1)))
    return root, path, {str(n): reason for n, (_, _, reason) in enumerate(cases, start=1)}


def run_with_alarm(seconds: int, fn, *args, **kwargs):
    """fn(*args) with SIGALRM after `seconds`: a regression that blocks on a FIFO fails, never hangs CI."""
    def hung(signum, frame):
        raise TimeoutError(f"still running after {seconds} s (blocked on a FIFO or device?)")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        return fn(*args, **kwargs)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_image_paths_stay_inside_the_root_and_name_regular_files(tmp_path):
    root, path, expected = contained_inputs_case(tmp_path)
    lake, result = run_with_alarm(60, ingest, tmp_path / "lake", path, "gen", "jsonl", image_root=str(root),
                                  max_image_bytes=2000)
    assert (result.n_read, result.n_accepted, result.n_quarantined) == (11, 2, 9)
    got = {q["row_identity"].split(":")[0]: q["reason"] for q in lake.read("quarantine").to_pylist()}
    assert got == {n: r for n, r in expected.items() if r is not None}
    details = {q["row_identity"].split(":")[0]: q["detail"] for q in lake.read("quarantine").to_pylist()}
    assert "--allow-outside-root" in details["2"] and "2000" in details["10"]
    assert ids.content_id((tmp_path / "outside" / "o.png").read_bytes()) not in lake.read("images").column(
        "image_id").to_pylist()


def test_allow_outside_root_reads_outside_paths_but_never_special_files(tmp_path):
    root, path, expected = contained_inputs_case(tmp_path)
    lake, result = run_with_alarm(60, ingest, tmp_path / "lake", path, "gen", "jsonl", image_root=str(root),
                                  allow_outside_root=True, max_image_bytes=2000)
    got = {q["row_identity"].split(":")[0]: q["reason"] for q in lake.read("quarantine").to_pylist()}
    assert got == {"7": "not_a_regular_file", "8": "not_a_regular_file", "9": "not_a_regular_file",
                   "10": "image_too_large", "11": "missing_image_file"}
    assert result.n_accepted == 6  # lines 1-6: the outside image is read when allowed


def test_hpdv2_paths_are_contained_too(tmp_path, hpd_images):
    root = tmp_path / "hpd"
    entries = [{"human_preference": [1, 0], "prompt": "p", "file_path": ["train/a.png", "../../etc/hostname"]},
               {"human_preference": [0, 1], "prompt": "q", "file_path": ["train/a.png", "train/b.png"]}]
    path = root / "train.json"
    path.write_text(json.dumps(entries))
    lake, result = ingest(tmp_path / "lake", path, "hpdv2", "hpdv2")
    assert (result.n_accepted, quarantine_reasons(lake)) == (1, {"image_outside_root": 1})


def test_csv_metadata_only(tmp_path):
    rows = [
        ["id", "prompt", "image_0", "image_1", "label", "annotator", "split"],
        ["a", "a cat, sitting", "u1", "u2", "1", "ann1", "test"],
        ["b", "dog", "u3", "u4", "0.5", "ann2", ""],
        ["c", "dog", "u3", "u4", "abc", "ann2", ""],
        ["d", "", "u5", "u6", "0", "ann3", ""],
        ["e", "short row", "u5"],
        ["f", "eel", "u7", "u7", "1", "ann1", ""],
        ["g", "eel", "u8", "", "1", "", ""],
    ]
    path = tmp_path / "prefs.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    lake, result = ingest(tmp_path / "lake", path, "csvsrc", "csv", metadata_only=True)
    assert (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined) == (7, 2, 0, 5)
    assert quarantine_reasons(lake) == {"wrong_type": 1, "empty_prompt": 1, "malformed_csv_row": 1,
                                        "identical_images": 1, "missing_image": 1}
    pairs = pairs_by_id(lake)
    a, b = pairs[ids.pair_id("csvsrc", "a")], pairs[ids.pair_id("csvsrc", "b")]
    assert (a["prompt"], a["label_0"], a["user_id"], a["split"]) == ("a cat, sitting", 1.0, "ann1", "test")
    assert (a["image_0_id"], a["image_1_id"]) == ("csvsrc:u1", "csvsrc:u2")
    assert (b["label_0"], b["split"]) == (0.5, "train")
    assert lake.read("images").num_rows == 0


def test_jsonl_metadata_only_numeric_ids(tmp_path):
    path = tmp_path / "ids.jsonl"
    path.write_text(json.dumps({"prompt": "kiwi", "image_0": 11, "image_1": 12, "label": "0", "annotator": 3,
                                "created_at": 1714564800}) + "\n")
    lake, result = ingest(tmp_path / "lake", path, "meta", "jsonl", metadata_only=True)
    assert (result.n_read, result.n_accepted) == (1, 1)
    [pair] = lake.read("pairs").to_pylist()
    assert pair["pair_id"] == ids.pair_id("meta", "1:11:12")
    assert (pair["image_0_id"], pair["image_1_id"]) == ("meta:11", "meta:12")
    assert (pair["label_0"], pair["user_id"]) == (0.0, "3")
    assert pair["created_at"].isoformat() == "2024-05-01T12:00:00+00:00"


@pytest.mark.parametrize("fmt, name, content, what", [
    ("csv", "prefs.csv", "prompt,image_0,label\nx,a.png,1\n", "image_1"),
    ("csv", "empty.csv", "", "no CSV header"),
    ("jsonl", "prefs.jsonl", '{"foo": 1}\n{"prompt": "x"}\n', "required field"),
    ("jsonl", "prefs.jsonl", "prompt,image_0,image_1,label\n", "none of the first"),
])
def test_generic_unreadable_writes_nothing(tmp_path, fmt, name, content, what):
    path = tmp_path / name
    path.write_text(content)
    lake = Lake(str(tmp_path / "lake"), create=True)
    with pytest.raises(UnreadableSourceError, match=what):
        ingest_file(lake, str(path), IngestConfig("gen", fmt), make_reader(fmt))
    assert_nothing_written(lake)


# -- WMT13 rankings ------------------------------------------------------------------------------

def expected_wmt(path: Path) -> tuple[int, int, set[str], set[str]]:
    """(pairs, ties, judges, segments) of a WMT rankings CSV, counted directly from its rows."""
    pairs = ties = 0
    judges, segments = set(), set()
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            ranks = [row[f"system{k}rank"] for k in range(1, 6) if row[f"system{k}rank"] not in ("", "-1")]
            for a, b in itertools.combinations(ranks, 2):
                pairs += 1
                ties += a == b
            judges.add(row["judgeId"])
            segments.add(row["srcIndex"])
    return pairs, ties, judges, segments


def test_wmt_head_of_real_train_csv(tmp_path):
    with open(shared_data(WMT_TRAIN)) as f:
        head = list(itertools.islice(f, 200))  # header + 199 rankings
    path = tmp_path / "wmt13_fr-en_rankings_train_head.csv"
    path.write_text("".join(head))
    n_pairs, n_ties, judges, segments = expected_wmt(path)
    lake, result = ingest(tmp_path / "lake", path, "wmt13", "wmt")
    assert (result.n_read, result.n_accepted, result.n_duplicates, result.n_quarantined) == (n_pairs, n_pairs, 0, 0)
    pairs = lake.read("pairs").to_pylist()
    assert sum(p["label_0"] == 0.5 for p in pairs) == n_ties
    assert {p["user_id"] for p in pairs} == judges
    assert {p["prompt"] for p in pairs} == {f"French-English segment {s}" for s in segments}
    # First ranking: turker_64 on segment 2484 ranks cu-zeman 2, RWTH 4, ..., uedin-heafield 1.
    by_id = pairs_by_id(lake)
    zeman, rwth, uedin = ("newstest2013.fr-en.cu-zeman.2738", "newstest2013.fr-en.RWTH_primary.2595",
                          "newstest2013.fr-en.uedin-heafield-unconstrained.2755")
    better = by_id[ids.pair_id("wmt13", f"1:turker_64:2484:{zeman}:{rwth}")]
    assert (better["label_0"], better["user_id"]) == (1.0, "turker_64")
    assert (better["model_0"], better["model_1"]) == (zeman, rwth)
    assert better["image_0_id"] == f"wmt13:2484/{zeman}"
    assert better["split"] == "train" and better["ranking_id"] == f"{path.name}:1"
    assert by_id[ids.pair_id("wmt13", f"1:turker_64:2484:{zeman}:{uedin}")]["label_0"] == 0.0


def test_wmt_real_test_csv_entirely(tmp_path):
    wmt_test = shared_data(WMT_TEST)
    n_pairs, n_ties, judges, segments = expected_wmt(wmt_test)
    lake, result = ingest(tmp_path / "lake", wmt_test, "wmt13", "wmt")
    assert (result.n_read, result.n_accepted, result.n_quarantined) == (n_pairs, n_pairs, 0)
    pairs = lake.read("pairs").to_pylist()
    assert len(pairs) == n_pairs and sum(p["label_0"] == 0.5 for p in pairs) == n_ties
    assert len({p["user_id"] for p in pairs}) == len(judges)
    assert len({p["prompt_id"] for p in pairs}) == len(segments)
    assert {p["split"] for p in pairs} == {"test"}
    # The batches are bounded, and add up to every pair.
    sizes = [b.num_rows for b in make_reader("wmt", batch_rows=64).batches(str(wmt_test), fsspec.filesystem("file"))]
    assert max(sizes) <= 64 and sum(sizes) == n_pairs


def test_wmt_problem_rows(tmp_path):
    header = shared_data(WMT_TEST).read_text().splitlines()[0]
    rows = [
        "French,English,7,-1,7,judge_a,-1,sysA,-1,sysB,-1,sysC,-1,,-1,,1,1,2,-1,-1",  # 3 pairs, one tie
        "French,English,8,-1,8,judge_a,-1,sysA,-1,sysB,-1,sysC,-1,sysD,-1,sysE,1,x,2,3,4",  # bad rank
        "French,English,9,-1,9,judge_b,-1,sysA,-1,sysB,-1,sysC,-1,sysD,-1,sysE,1,-1,-1,-1,-1",  # 1 ranked
        "French,English,9,-1,9,judge_b,-1,sysA,-1,sysA,-1,,-1,,-1,,1,2,,,",  # same system twice
        "French,English,9,judge_b",
    ]
    path = tmp_path / "rankings.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    lake, result = ingest(tmp_path / "lake", path, "wmt13", "wmt")
    assert (result.n_read, result.n_accepted, result.n_quarantined) == (7, 3, 4)
    assert quarantine_reasons(lake) == {"wrong_type": 1, "fewer_than_two_ranked": 1, "identical_images": 1,
                                        "malformed_csv_row": 1}
    labels = {(p["model_0"], p["model_1"]): p["label_0"] for p in lake.read("pairs").to_pylist()}
    assert labels == {("sysA", "sysB"): 0.5, ("sysA", "sysC"): 1.0, ("sysB", "sysC"): 1.0}


def test_wmt_missing_columns_writes_nothing(tmp_path):
    path = tmp_path / "rankings.csv"
    path.write_text("srclang,trglang,srcIndex,system1Id,system1rank\nFrench,English,1,a,1\n")
    lake = Lake(str(tmp_path / "lake"), create=True)
    with pytest.raises(UnreadableSourceError, match="judgeId"):
        ingest_file(lake, str(path), IngestConfig("wmt13", "wmt"), make_reader("wmt"))
    assert_nothing_written(lake)
