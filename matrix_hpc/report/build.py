"""Assemble a report: read the columns, aggregate, draw, lay out.

The counts (rows by status, distinct ids, tokens, error kinds, the
workflow's metrics) arrive ready in :class:`ReportInput`, computed by the
code ``matrix-hpc inspect`` prints them with; this module adds the figures
from the run's own timing columns.

    report = build_report(ReportInput(out, files, summarize_output(out), output_totals(files)))
    Path("report.html").write_text(report.html)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from matrix_hpc.report import aggregate as agg
from matrix_hpc.report import figures
from matrix_hpc.report.columns import read_report_columns
from matrix_hpc.store.verify import OutputSummary, OutputTotals

#: Row columns every figure reads (never ``input``, ``result``, message ``content``).
ROW_COLUMNS = ["status", "t_admitted", "t_finished", "duration_s", "prompt_tokens", "completion_tokens"]
MESSAGE_FIELDS = ["agent", "t_start", "t_end"]
#: The workflows' own result columns that have a panel (read when the output has them).
WORKFLOW_COLUMNS = ["agreed", "correct", "turns", "stop_reason", "dropped_at", "language", "reward", "db_reward",
                    "communicate_reward", "reward_breakdown", "termination_reason"]


@dataclass
class ReportInput:
    out_dir: Path
    files: list[Path]  # the readable part files
    summary: OutputSummary  # rows by status, distinct ids, duplicates (store.verify.summarize_output)
    totals: OutputTotals  # tokens, retries, error kinds, filter reasons (store.verify.output_totals)
    workflow: str | None = None  # the recorded workflow (``name: coral``)
    workflow_metrics: dict[str, str] = field(default_factory=dict)  # the workflow's summarize(), formatted
    notes: list[str] = field(default_factory=list)  # repairs done, problems found


@dataclass
class Figure:
    key: str  # file stem and HTML id
    title: str
    png: bytes
    caption: str = ""


@dataclass
class Report:
    html: str
    figures: list[Figure]
    timeline: agg.Timeline
    latency: agg.Distribution
    roles: list[agg.RoleLatency]


def build_report(inp: ReportInput) -> Report:
    from matrix_hpc.report.page import render_page

    rows = read_report_columns(inp.files, ROW_COLUMNS + _workflow_columns(inp.files), [])
    tokens = agg.row_tokens(rows.column("prompt_tokens"), rows.column("completion_tokens"))
    tl = agg.timeline(rows.column("t_admitted"), rows.column("t_finished"), rows.column("status"), tokens)
    latency = agg.distribution(agg.as_numpy(rows.column("duration_s")))
    durations, lengths = _message_stats(inp.files)
    roles = agg.step_latency(durations)
    figs = [
        Figure("throughput", "Throughput over time", figures.throughput(tl),
               "Rows committed per second (left) and their tokens per second (right), by finish time."),
        Figure("status_over_time", "Completions by status over time", figures.completions_by_status(tl)),
        Figure("task_latency", "Task latency", figures.histogram(latency, "Task latency", "seconds from admission "
                                                                 "to finish (duration_s)")),
        Figure("step_latency", "Step latency per role", figures.step_latency(roles),
               "t_end - t_start of each message, by the agent that wrote it."),
        Figure("tokens_per_row", "Tokens per row", figures.histogram(
            agg.distribution(tokens), "Tokens per row", "prompt + completion tokens")),
        Figure("turns", "Turns per dialogue", figures.histogram(
            agg.distribution(lengths, integer=True), "Messages per row", "messages in the row's history",
            marks=False)),
    ]
    for n, panel in enumerate(agg.workflow_panels(rows)):
        figs.append(Figure(f"workflow_{n + 1}", panel.title, figures.bars(panel)))
    html = render_page(inp, figs, tl, latency, roles, generated=dt.datetime.now(dt.UTC))
    return Report(html, figs, tl, latency, roles)


def _workflow_columns(files: list[Path]) -> list[str]:
    names: set[str] = set()
    for f in files:
        names.update(pq.read_schema(f).names)
    return [c for c in WORKFLOW_COLUMNS if c in names]


def _message_stats(files: list[Path]) -> tuple[dict[str, list[np.ndarray]], np.ndarray]:
    """Step durations per role and messages per row, read file by file (the
    message fields of a million rows never sit in memory at once)."""
    durations: dict[str, list[np.ndarray]] = {}
    lengths = []
    for f in files:
        messages = read_report_columns([f], [], MESSAGE_FIELDS).column("messages")
        lengths.append(agg.messages_per_row(messages))
        for role, d in agg.step_durations(messages).items():
            durations.setdefault(role, []).append(d)
    return durations, np.concatenate(lengths) if lengths else np.empty(0)
