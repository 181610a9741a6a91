"""matrix-hpc report's aggregation on tables with known answers, its column
projection, its page (self-contained, numbers equal inspect's) and its errors."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from matrix_hpc.report import aggregate as agg
from matrix_hpc.report.columns import read_report_columns
from matrix_hpc.store.layout import META_DIR, part_file_name, shard_dir, write_table_atomic
from matrix_hpc.store.rows import MESSAGE_TYPE, output_schema

CORAL = {"agreed": pa.bool_(), "correct": pa.bool_(), "turns": pa.int32(), "stop_reason": pa.string()}


def msg(agent: str, t_start: float, t_end: float, tokens: int = 1) -> dict[str, object]:
    return {"agent": agent, "role": "assistant", "content": "x" * 50, "t_start": t_start, "t_end": t_end,
            "prompt_tokens": tokens, "completion_tokens": tokens}


def coral_rows() -> list[dict[str, object]]:
    """6 rows: 4 ok dialogues (3 agreed, 2 of them correct), 1 filtered, 1 failed; timed from t=100."""
    rows = []
    for i, (status, agreed, correct, turns) in enumerate([("ok", True, True, 2), ("ok", True, False, 3),
                                                          ("ok", False, False, 20), ("ok", True, True, 1),
                                                          ("filtered", None, None, None), ("failed", None, None, None)]):
        messages = [msg("teacher", 100 + i, 100.5 + i, 10), msg("extractor", 100.5 + i, 100.6 + i, 2)]
        rows.append({"id": f"q{i}", "status": status, "error_type": "TimeoutError" if status == "failed" else None,
                     "error": "the LLM did not answer in 60 s" if status == "failed" else None,
                     "reason": "too easy" if status == "filtered" else None, "messages": messages,
                     "attempts": 2 if i == 1 else 1, "prompt_tokens": 12, "completion_tokens": 12,
                     "t_admitted": 100.0, "t_finished": 101.0 + i, "duration_s": 1.0 + i, "run_id": "r1",
                     "agreed": agreed, "correct": correct, "turns": turns,
                     "stop_reason": "agreed" if agreed else ("max_turns" if status == "ok" else None)})
    return rows


def write_output(out: Path, rows: list[dict[str, object]], extra: dict[str, pa.DataType], files: int = 2,
                 workflow: str | None = "coral") -> Path:
    """``rows`` as committed part files, written by the store's own writer."""
    schema = output_schema(extra)
    for k in range(files):
        part = rows[k::files]
        path = shard_dir(out, k) / part_file_name("r1", k, "0000000a", 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_table_atomic(pa.Table.from_pylist(part, schema=schema), path)
    if workflow:
        (out / META_DIR).mkdir(exist_ok=True)
        (out / META_DIR / "workflow.yaml").write_text(f"name: {workflow}\nmax_turns: 20\n")
    return out


# -- aggregation -------------------------------------------------------------------------------
def test_timeline_bins_rows_by_finish_time_and_status() -> None:
    t = pa.Table.from_pylist(coral_rows())
    tokens = agg.row_tokens(t.column("prompt_tokens"), t.column("completion_tokens"))
    tl = agg.timeline(t.column("t_admitted"), t.column("t_finished"), t.column("status"), tokens)
    assert tl.t0 == 100.0 and list(tl.by_status) == ["ok", "filtered", "failed"]
    assert {s: int(c.sum()) for s, c in tl.by_status.items()} == {"ok": 4, "filtered": 1, "failed": 1}
    assert tl.edges_s[0] == 0 and tl.edges_s[-1] >= 6.0  # last row finished 6 s after the first admission
    assert float(tl.tokens.sum()) == 6 * 24
    assert float((tl.rows_per_s() * tl.width_s).sum()) == pytest.approx(6)
    last = {s: int(c[-1]) for s, c in tl.cumulative().items()}
    assert last == {"ok": 4, "filtered": 1, "failed": 1}
    # the ok rows finished at 1, 2, 3, 4 s: in the bins holding those times
    centre_of = np.repeat((tl.edges_s[:-1] + tl.edges_s[1:]) / 2, tl.by_status["ok"])
    assert np.allclose(centre_of, [1, 2, 3, 4], atol=tl.width_s / 2 + 1e-9)


def test_timeline_leaves_out_untimed_rows() -> None:
    t = pa.table({"t_admitted": [None, 5.0], "t_finished": [None, 7.0], "status": [None, "ok"]},
                 schema=pa.schema([("t_admitted", pa.float64()), ("t_finished", pa.float64()),
                                   ("status", pa.string())]))
    tl = agg.timeline(t.column("t_admitted"), t.column("t_finished"), t.column("status"), np.zeros(2))
    assert tl.untimed == 1 and {s: int(c.sum()) for s, c in tl.by_status.items()} == {"ok": 1}


def test_distribution_percentiles_and_histogram() -> None:
    d = agg.distribution(np.append(np.arange(1, 101, dtype=float), np.nan))
    assert d.count == 100 and d.mean == 50.5 and d.max == 100
    assert d.percentiles[50] == pytest.approx(50.5) and d.percentiles[99] == pytest.approx(99.01)
    assert int(d.counts.sum()) == 100
    ints = agg.distribution(np.array([1.0, 2, 2, 3, 3, 3]), integer=True)
    assert list(ints.counts) == [1, 2, 3] and list(ints.edges) == [0.5, 1.5, 2.5, 3.5]
    assert agg.distribution(np.array([np.nan])).count == 0


def test_step_durations_per_role() -> None:
    messages = pa.array([[msg("teacher", 0, 2), msg("student", 2, 2.5)], None, [msg("teacher", 10, 14)]],
                        pa.list_(MESSAGE_TYPE))
    durations = agg.step_durations(messages)
    assert list(durations) == ["teacher", "student"]
    assert list(durations["teacher"]) == [2.0, 4.0] and list(durations["student"]) == [0.5]
    roles = agg.step_latency({"teacher": [durations["teacher"], np.array([6.0])], "student": [durations["student"]]})
    teacher = roles[0]
    assert (teacher.role, teacher.count, teacher.mean_s, teacher.percentiles_s[50]) == ("teacher", 3, 4.0, 4.0)
    assert list(agg.messages_per_row(messages)[[0, 2]]) == [2, 1] and np.isnan(agg.messages_per_row(messages)[1])


def test_coral_panels_count_agreement_and_correctness_of_ok_rows() -> None:
    panels = {p.title: p for p in agg.workflow_panels(pa.Table.from_pylist(coral_rows()))}
    assert panels["Dialogues: agreement and correctness"].bars == [
        ("dialogues (ok)", 4.0), ("agreed", 3.0), ("agreed and correct", 2.0)]
    turns = panels["Matcher checks per dialogue (turns)"].distribution
    assert turns is not None and turns.count == 4 and turns.mean == pytest.approx(26 / 4)
    assert panels["Why dialogues stopped"].bars == [("agreed", 3.0), ("max_turns", 1.0)]


def test_natural_reasoning_funnel() -> None:
    dropped = ["filter"] * 3 + ["score"] * 2 + ["question"] + [None] * 4
    t = pa.table({"status": ["filtered"] * 6 + ["ok"] * 4, "dropped_at": dropped,
                  "language": ["en"] * 8 + ["de"] * 2})
    panels = agg.workflow_panels(t)
    assert panels[0].bars == [("documents in", 10.0), ("passed filter", 7.0), ("passed score", 5.0),
                              ("passed question", 4.0)]
    assert panels[1].bars == [("en", 8.0), ("de", 2.0)]


def test_reward_components_from_columns_and_from_a_json_breakdown() -> None:
    t = pa.table({"status": ["ok", "ok", "ok", "failed"], "reward": [1.0, 0.0, 1.0, None],
                  "db_reward": [1.0, 0.0, 1.0, None], "communicate_reward": [1.0, 1.0, 0.0, None],
                  "reward_breakdown": [json.dumps({"DB": 1.0, "ACTION": 1.0}), json.dumps({"DB": 0.0}),
                                       json.dumps({"DB": 1.0, "ACTION": 0.0}), None],
                  "termination_reason": ["user_stop", "max_steps", "user_stop", None]})
    panels = {p.title: p for p in agg.workflow_panels(t)}
    means = dict(panels["Reward components (mean over ok rows)"].bars)
    assert means == pytest.approx({"reward": 2 / 3, "db_reward": 2 / 3, "communicate_reward": 2 / 3,
                                   "ACTION": 0.5, "DB": 2 / 3})
    assert panels["Termination reasons"].bars == [("user_stop", 2.0), ("max_steps", 1.0)]


# -- reading -----------------------------------------------------------------------------------
def test_projection_reads_message_fields_without_content_and_fills_missing_columns(tmp_path: Path) -> None:
    out = write_output(tmp_path / "out", coral_rows(), CORAL)
    old = shard_dir(out, 7) / part_file_name("r0", 0, "0000000b", 1)  # an older file without workflow columns
    old.parent.mkdir()
    pq.write_table(pa.table({"id": ["z"], "status": ["ok"], "t_finished": [3.0]}), old)
    files = sorted(out.glob("shard=*/*.parquet"))
    t = read_report_columns(files, ["status", "t_finished", "turns", "duration_s"], ["agent", "t_end"])
    assert t.num_rows == 7 and t.column_names == ["status", "t_finished", "turns", "duration_s", "messages"]
    assert t.schema.field("messages").type == pa.list_(pa.struct([MESSAGE_TYPE.field("agent"),
                                                                  MESSAGE_TYPE.field("t_end")]))
    assert t.column("turns").null_count == 3  # filtered, failed, and the old file's row
    assert sorted(t.column("duration_s").drop_null().to_pylist()) == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


# -- the page and the command ------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.numbers: dict[str, str] = {}
        self.images: list[str] = []
        self.refs: list[str] = []
        self.scripts = 0
        self._key: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self._key = a.get("data-key")
        self.scripts += tag == "script"
        if tag == "img":
            self.images.append(a.get("src") or "")
        self.refs += [v for k, v in attrs if k in ("src", "href") and v and not v.startswith("data:")]

    def handle_data(self, data: str) -> None:
        if self._key:
            self.numbers[self._key] = data
            self._key = None


def inspect_numbers(text: str) -> dict[str, str]:
    """The numbers ``inspect`` prints, under the report's data-key names."""
    head = re.search(r"(\d+) rows in (\d+) files \((\d+) distinct ids\)", text)
    assert head, text
    found = {"rows": head[1], "distinct_ids": head[3]}
    found |= {f"status.{k}": v for k, v in re.findall(r"(\w+) (\d+) \(\d+\.\d%\)", text.split("\n")[1])}
    tokens = re.search(r"tokens: prompt ([\d,]+), completion ([\d,]+), total ([\d,]+)", text)
    assert tokens, text
    found |= {"tokens.prompt": tokens[1], "tokens.completion": tokens[2], "tokens.total": tokens[3]}
    found["retried"] = re.findall(r"rows whose steps were retried: (\d+)", text)[0]
    found |= {f"error.{k}": v for k, v in re.findall(r"error (\S+) x(\d+)", text)}
    found |= {f"workflow.{k}": v for k, v in re.findall(r"^  (agreement_rate|agreement_correctness|accuracy|"
                                                        r"mean_turns|dialogues): (\S+)$", text, re.M)}
    return {k: v.replace(",", "") for k, v in found.items()}


def test_report_page_is_self_contained_and_its_numbers_are_inspects(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matrix_hpc.cli.main import main

    out = write_output(tmp_path / "out", coral_rows(), CORAL)
    assert main(["inspect", str(out)]) == 0
    expected = inspect_numbers(capsys.readouterr().out)
    (tmp_path / "reports").mkdir()  # --out a directory: report.html in it
    assert main(["report", str(out), "--out", str(tmp_path / "reports"), "--png", str(tmp_path / "png")]) == 0
    assert "wrote" in capsys.readouterr().out
    page = _Page()
    page.feed((tmp_path / "reports" / "report.html").read_text())
    assert page.refs == [] and page.scripts == 0  # nothing fetched: opens offline
    assert len(page.images) == 6 + 3 and all(src.startswith("data:image/png;base64,") for src in page.images)
    got = {k: page.numbers.get(k, "").replace(",", "") for k in expected}
    assert got == expected
    assert {"status.ok", "status.filtered", "status.failed", "error.TimeoutError", "workflow.accuracy"} <= set(got)
    pngs = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert len(pngs) == 9 and all((tmp_path / "png" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    default = main(["report", str(out)])
    assert default == 0 and (out / META_DIR / "report.html").exists()
    (tmp_path / "blocked").write_text("a file where a directory should be")
    assert main(["report", str(out), "--out", str(tmp_path / "blocked" / "r.html")]) == 2
    assert "cannot write the report" in capsys.readouterr().err


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "f.txt").write_text("x") and p / "f.txt", "is not a directory"),
    (lambda p: p, "is empty"),
    (lambda p: (p / "data.jsonl").write_text("{}") and p, "holds no committed rows"),
])
def test_report_refuses_what_is_not_an_output(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             make: object, message: str) -> None:
    from matrix_hpc.cli.main import main

    target = make(tmp_path)  # type: ignore[operator]
    assert main(["report", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("matrix-hpc: error: ") and message in err and str(target) in err
    assert "Traceback" not in err


def test_workflow_summaries_over_tables_equal_their_row_by_row_definition() -> None:
    """inspect and report summarise a million rows with Arrow; the answer is the row-by-row one."""
    from matrix_hpc.workflows import coral, natural_reasoning

    t = pa.Table.from_pylist(coral_rows() + [{"id": "n", "status": None, "agreed": True, "turns": None}])
    assert coral.summarize(t) == coral.summarize(t.to_pylist())
    assert coral.summarize(t)["agreement_rate"] == 3 / 4 and coral.summarize(t)["mean_turns"] == 26 / 4
    docs = pa.table({"status": ["filtered", "filtered", "ok", "ok", "filtered", None],
                     "dropped_at": ["filter", "score", None, None, "question", "filter"],
                     "language": ["de", "en", "en", "", None, "fr"], "final_answer": [None, None, "42", "", None, None]})
    assert natural_reasoning.summarize(docs) == natural_reasoning.summarize(docs.to_pylist())
    assert natural_reasoning.summarize(docs)["dropped_at"] == {"filter": 1, "score": 1, "question": 1}
    empty = pa.table({"status": pa.array([], pa.string())})
    assert coral.summarize(empty) == coral.summarize([]) and natural_reasoning.summarize(empty) == \
        natural_reasoning.summarize([])
