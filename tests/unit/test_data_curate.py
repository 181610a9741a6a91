"""Export and curation logic without Ray: text, signatures, the benchmark index, plans, destinations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from matrix_hpc.data.decontaminate import bench_rows, build_index, match
from matrix_hpc.data.dedup import DedupConf, band_hashes, signatures
from matrix_hpc.data.plan import open_plan
from matrix_hpc.data.source import OutputSource, SourceError, check_destination, parse_statuses
from matrix_hpc.data.text import column_texts, ngrams, normalise
from tests.data_out_support import output_row, random_text, write_output


def test_normalise_ignores_case_punctuation_and_spacing() -> None:
    assert normalise("  Hello,  World!\n") == normalise("hello world") == "hello world"
    assert ngrams("a b c d".split(), 3) == ["a b c", "b c d"] and ngrams(["a"], 3) == []


def test_column_texts_reads_json_paths_and_joins_columns() -> None:
    import pyarrow as pa

    t = pa.table({"result": [json.dumps({"answer": "x", "steps": ["a", "b"]}), None, "not json"],
                  "input": ['{"q": "why"}', '{"q": "how"}', "{}"]})
    assert column_texts(t, ["result.answer", "input.q"]) == ["x\nwhy", "how", None]
    assert column_texts(t, ["result.steps"]) == ["a b", None, None]


def test_signatures_estimate_similarity_and_bands_agree_on_equal_signatures() -> None:
    rng = random.Random(0)
    a = random_text(rng, 80)
    near = a.replace(a.split()[40], "changed")
    exact, sigs, has_text = signatures([a, a.upper() + "!", near, random_text(rng, 80), None, " ,. "], 5, 128)
    assert has_text.tolist() == [True, True, True, True, False, False]
    assert exact[0] == exact[1] != exact[2]
    assert np.mean(sigs[0] == sigs[2]) > 0.75 and np.mean(sigs[0] == sigs[3]) < 0.1
    b, r = DedupConf(("x",)).bands
    bands = band_hashes(sigs, b, r)
    assert (bands[0] == bands[1]).all() and not (bands[0] == bands[3]).any()
    equal_band = [j for j in range(b) if (sigs[0, j * r:(j + 1) * r] == sigs[2, j * r:(j + 1) * r]).all()]
    assert [j for j in range(b) if bands[0, j] == bands[2, j]] == equal_band


def test_benchmark_index_matches_runs_of_n_words(tmp_path: Path) -> None:
    bench = tmp_path / "b.jsonl"
    bench.write_text(json.dumps({"q": "one two three four five six", "options": ["seven eight nine ten"]}) + "\n"
                     + json.dumps({"q": "alpha beta gamma delta"}) + "\n")
    index = build_index([bench], 4)
    hit = match("xx Alpha, beta GAMMA delta yy", index, 4)
    assert hit is not None and (hit["file"], hit["row"], hit["ngram"]) == (0, 1, "alpha beta gamma delta")
    assert match("seven eight nine ten", index, 4) == {"file": 0, "row": 0, "ngram": "seven eight nine ten",
                                                         "matches": 1}
    assert match("alpha beta gamma", index, 4) is None  # shorter than the n-gram
    assert build_index([bench], 4, ("options",)).hashes.size == 1


def test_benchmark_file_errors_name_the_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        bench_rows(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n{oops\n')
    with pytest.raises(SourceError, match=r"bad.jsonl:2: not JSON"):
        bench_rows(bad)
    (tmp_path / "x.csv").write_text("a\n")
    with pytest.raises(SourceError, match="not a .jsonl"):
        bench_rows(tmp_path / "x.csv")


def test_statuses_and_destinations_are_checked(tmp_path: Path) -> None:
    assert parse_statuses("ok, failed", False) == ("ok", "failed") and parse_statuses("x", True) is None
    with pytest.raises(SourceError, match="unknown status"):
        parse_statuses("ok,done", False)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceError, match="overlaps the output directory"):
        check_destination(out, out / "sub" / "x", force=True)
    with pytest.raises(SourceError, match="overlaps"):
        check_destination(out / "a", tmp_path, force=True)
    with pytest.raises(SourceError, match="not a matrix-hpc output directory"):
        OutputSource.open(out)


def test_a_plan_is_recorded_once_and_a_changed_output_or_setting_is_refused(tmp_path: Path) -> None:
    rng = random.Random(2)
    out, dest = tmp_path / "out", tmp_path / "dest"
    write_output(out, [output_row(f"t{i}", random_text(rng, 10)) for i in range(40)], num_shards=2,
                 files_per_shard=2)
    params = DedupConf(("result.answer",)).params()
    plan = open_plan(out, dest, "dedup", params, force=False)
    assert len(plan.units) == 4 and sum(u.rows for u in plan.units) == 40
    assert open_plan(out, dest, "dedup", params, force=False).units == plan.units
    with pytest.raises(SourceError, match="other settings"):
        open_plan(out, dest, "dedup", {**params, "threshold": 0.5}, force=False)
    (out / plan.units[0].file).unlink()
    with pytest.raises(SourceError, match="changed since this curation began"):
        open_plan(out, dest, "dedup", params, force=False)
    assert len(open_plan(out, dest, "dedup", params, force=True).units) == 3  # start over
    (tmp_path / "other").mkdir()
    with pytest.raises(SourceError, match="not a curation of this kind in progress"):
        open_plan(out, tmp_path / "other", "dedup", params, force=False)


def test_an_export_of_no_rows_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    from matrix_hpc.data.export import export_hf, export_jsonl

    write_output(tmp_path / "out", [output_row(f"t{i}", "x", "failed") for i in range(5)])
    for export, dest in ((export_jsonl, tmp_path / "x.jsonl"), (export_hf, tmp_path / "hf")):
        with pytest.raises(SourceError, match="holds no rows with status ok"):
            export(tmp_path / "out", dest)
        assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left behind
