"""What the report's figures plot, computed with Arrow compute and numpy over
whole columns (no Python object per row), so a million rows take seconds.

Every function takes columns (or a table of them) and returns plain numbers
and numpy arrays; :mod:`matrix_hpc.report.figures` draws them.

    tl = timeline(t_admitted, t_finished, status, tokens)
    tl.rows_per_s(), tl.by_status["ok"], tl.edges_s
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Percentiles summarised for a latency (and drawn as a box: whiskers p5/p95, box p25/p75).
PERCENTILES = (5, 25, 50, 75, 95, 99)
MAX_TIME_BINS = 120
STATUS_ORDER = ("ok", "filtered", "failed")


def as_numpy(column: pa.ChunkedArray | pa.Array, fill: float = np.nan) -> np.ndarray:
    """A numeric column as float64 numpy, nulls as ``fill``."""
    return np.asarray(pc.fill_null(pc.cast(column, pa.float64()), fill).to_numpy(zero_copy_only=False))


def statuses(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """``status`` with nulls read as ``failed`` (as the store's summary reads them)."""
    return pc.fill_null(column, "failed")


@dataclass
class Timeline:
    """Rows finished per time bin, by status, since the first admission."""

    t0: float  # epoch seconds of the first admission
    edges_s: np.ndarray  # bin edges, seconds since t0
    by_status: dict[str, np.ndarray]  # rows finished in each bin
    tokens: np.ndarray  # prompt+completion tokens of the rows finished in each bin
    untimed: int = 0  # rows without timestamps (not plotted)

    @property
    def width_s(self) -> float:
        return float(self.edges_s[1] - self.edges_s[0]) if len(self.edges_s) > 1 else 1.0

    def rows_per_s(self) -> np.ndarray:
        total = sum(self.by_status.values(), np.zeros(len(self.edges_s) - 1))
        return np.asarray(total / self.width_s)

    def tokens_per_s(self) -> np.ndarray:
        return np.asarray(self.tokens / self.width_s)

    def cumulative(self) -> dict[str, np.ndarray]:
        return {s: np.cumsum(c) for s, c in self.by_status.items()}


def timeline(t_admitted: pa.ChunkedArray, t_finished: pa.ChunkedArray, status: pa.ChunkedArray,
             tokens: np.ndarray, max_bins: int = MAX_TIME_BINS) -> Timeline:
    """Bin rows by their finish time: about sqrt(rows) bins, at most ``max_bins``, of a whole number of
    seconds when the run is longer than that many seconds."""
    finished = as_numpy(t_finished)
    timed = ~np.isnan(finished)
    admitted = as_numpy(t_admitted)[timed]
    finished = finished[timed]
    if not len(finished):
        return Timeline(0.0, np.array([0.0, 1.0]), {}, np.zeros(1), untimed=int((~timed).sum()))
    t0 = float(np.nanmin(admitted)) if np.isfinite(admitted).any() else float(finished.min())
    span_s = max(float(finished.max()) - t0, 1e-3)
    bins = int(np.clip(np.sqrt(len(finished)), 10, max_bins))  # few rows: wider bins, not a comb of spikes
    width_s = span_s / bins if span_s < bins else float(np.ceil(span_s / bins))
    edges = np.arange(0, span_s + width_s, width_s)
    if len(edges) < 2:
        edges = np.array([0.0, width_s])
    rel = finished - t0
    status_codes = pc.dictionary_encode(statuses(status)).combine_chunks() if isinstance(
        status, pa.ChunkedArray) else pc.dictionary_encode(statuses(status))
    names = status_codes.dictionary.to_pylist()
    codes = np.asarray(status_codes.indices.to_numpy(zero_copy_only=False))[timed]
    by_status = {str(name): np.histogram(rel[codes == k], edges)[0] for k, name in enumerate(names)
                 if (codes == k).any()}
    token_bins = np.histogram(rel, edges, weights=tokens[timed])[0]
    return Timeline(t0, edges, order_statuses(by_status), token_bins, untimed=int((~timed).sum()))


def order_statuses(counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """ok, filtered, failed first, then any other status (stable colours and legend)."""
    first = [s for s in STATUS_ORDER if s in counts]
    return {s: counts[s] for s in first + sorted(set(counts) - set(first))}


@dataclass
class Distribution:
    """Summary of one numeric column: count, mean, percentiles, and a histogram."""

    count: int
    mean: float
    percentiles: dict[int, float]  # percentile -> value
    edges: np.ndarray
    counts: np.ndarray
    max: float = 0.0


def distribution(values: np.ndarray, bins: int = 50, integer: bool = False) -> Distribution:
    """NaNs are left out. ``integer``: one bin per value when the range is small."""
    v = values[~np.isnan(values)]
    if not len(v):
        return Distribution(0, float("nan"), {}, np.array([0.0, 1.0]), np.zeros(1, np.int64))
    lo, hi = float(v.min()), float(v.max())
    if integer and hi - lo <= bins:
        edges = np.arange(lo - 0.5, hi + 1.5)
    else:
        edges = np.linspace(lo, hi if hi > lo else lo + 1, bins + 1)
    counts = np.histogram(v, edges)[0]
    pct = dict(zip(PERCENTILES, (float(x) for x in np.percentile(v, PERCENTILES)), strict=True))
    return Distribution(len(v), float(v.mean()), pct, edges, counts, hi)


def row_tokens(prompt: pa.ChunkedArray, completion: pa.ChunkedArray) -> np.ndarray:
    """Prompt + completion tokens per row (a null counts as 0)."""
    total: np.ndarray = as_numpy(prompt, 0.0) + as_numpy(completion, 0.0)
    return total


def messages_per_row(messages: pa.ChunkedArray) -> np.ndarray:
    """Length of each row's message history (NaN where it is null)."""
    return as_numpy(pc.list_value_length(messages))


@dataclass
class RoleLatency:
    role: str
    count: int
    mean_s: float
    percentiles_s: dict[int, float]


def step_durations(messages: pa.ChunkedArray | pa.Array) -> dict[str, np.ndarray]:
    """Per agent role (in order of first appearance): ``t_end - t_start`` of
    each of its messages, in seconds (messages without timestamps left out)."""
    flat = pc.list_flatten(messages)
    if isinstance(flat, pa.ChunkedArray):
        flat = flat.combine_chunks()
    if not len(flat):
        return {}
    duration = as_numpy(pc.subtract(flat.field("t_end"), flat.field("t_start")))
    encoded = pc.dictionary_encode(pc.fill_null(flat.field("agent"), "?"))
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False))
    timed = ~np.isnan(duration)
    return {str(role): duration[(codes == k) & timed] for k, role in enumerate(encoded.dictionary.to_pylist())}


def step_latency(durations: dict[str, list[np.ndarray]]) -> list[RoleLatency]:
    """Summary per role of the step durations gathered (file by file) by :func:`step_durations`."""
    out = []
    for role, parts in durations.items():
        d = np.concatenate(parts) if parts else np.empty(0)
        if len(d):
            pct = dict(zip(PERCENTILES, (float(x) for x in np.percentile(d, PERCENTILES)), strict=True))
            out.append(RoleLatency(role, len(d), float(d.mean()), pct))
    return out


def value_counts(column: pa.ChunkedArray | pa.Array, top: int | None = None) -> list[tuple[str, int]]:
    """Non-null values and their counts, most frequent first."""
    valid = column.filter(pc.is_valid(column))
    pairs = [(str(v["values"]), int(v["counts"])) for v in pc.value_counts(valid).to_pylist()]
    pairs.sort(key=lambda kv: (-kv[1], kv[0]))
    return pairs[:top] if top is not None else pairs


def true_count(column: pa.ChunkedArray | pa.Array) -> int:
    return int(pc.sum(pc.cast(pc.fill_null(column, False), pa.int64())).as_py() or 0)


# -- the workflows' own result columns -------------------------------------------------------
@dataclass
class WorkflowPanel:
    """One workflow figure: a title and bars (label -> value), or a distribution."""

    title: str
    bars: list[tuple[str, float]] = field(default_factory=list)
    unit: str = "rows"
    distribution: Distribution | None = None
    xlabel: str = ""


def workflow_panels(t: pa.Table) -> list[WorkflowPanel]:
    """The panels whose columns are present: Coral agreement and correctness,
    NaturalReasoning's stage funnel, tau2/retail reward components."""
    ok = t.filter(pc.equal(statuses(t.column("status")), "ok")) if "status" in t.column_names else t
    panels: list[WorkflowPanel] = []
    if "agreed" in t.column_names:
        panels += _coral(ok)
    if "dropped_at" in t.column_names:
        panels += _funnel(t)
    if "reward" in t.column_names:
        panels += _rewards(ok)
    return panels


def _coral(ok: pa.Table) -> list[WorkflowPanel]:
    agreed = true_count(ok.column("agreed"))
    bars = [("dialogues (ok)", float(ok.num_rows)), ("agreed", float(agreed))]
    if "correct" in ok.column_names:
        bars.append(("agreed and correct", float(true_count(ok.column("correct")))))
    panels = [WorkflowPanel("Dialogues: agreement and correctness", bars)]
    if "turns" in ok.column_names:
        panels.append(WorkflowPanel("Matcher checks per dialogue (turns)",
                                    distribution=distribution(as_numpy(ok.column("turns")), integer=True),
                                    xlabel="turns", unit="dialogues"))
    if "stop_reason" in ok.column_names:
        panels.append(WorkflowPanel("Why dialogues stopped", [(k, float(v)) for k, v in
                                                              value_counts(ok.column("stop_reason"), 10)]))
    return panels


#: NaturalReasoning's stages in funnel order (the values of its ``dropped_at`` column).
FUNNEL_STAGES = ("filter", "score", "question")


def _funnel(t: pa.Table) -> list[WorkflowPanel]:
    dropped = dict(value_counts(t.column("dropped_at")))
    remaining = float(t.num_rows)
    bars = [("documents in", remaining)]
    for stage in FUNNEL_STAGES:
        remaining -= dropped.get(stage, 0)
        bars.append((f"passed {stage}", remaining))
    panels = [WorkflowPanel("Stage funnel", bars, unit="documents")]
    if "language" in t.column_names:
        panels.append(WorkflowPanel("Languages (top 10)", [(k, float(v)) for k, v in
                                                           value_counts(t.column("language"), 10)], unit="documents"))
    return panels


#: Reward components written as their own columns ...
REWARD_COLUMNS = ("reward", "db_reward", "communicate_reward")
#: ... or as a JSON object per row (tau2): ``{"DB": 1.0, "COMMUNICATE": 0.0, ...}``.
REWARD_BREAKDOWN = "reward_breakdown"


def _rewards(ok: pa.Table) -> list[WorkflowPanel]:
    means = [(c, float(np.nanmean(v))) for c in REWARD_COLUMNS if c in ok.column_names
             and len(v := as_numpy(ok.column(c))) and not np.isnan(v).all()]
    if REWARD_BREAKDOWN in ok.column_names:
        means += breakdown_means(ok.column(REWARD_BREAKDOWN))
    panels = [WorkflowPanel("Reward components (mean over ok rows)", means, unit="mean reward")]
    panels.append(WorkflowPanel("Reward per row", distribution=distribution(as_numpy(ok.column("reward")), bins=20),
                                xlabel="reward", unit="rows"))
    if "termination_reason" in ok.column_names:
        panels.append(WorkflowPanel("Termination reasons", [(k, float(v)) for k, v in
                                                            value_counts(ok.column("termination_reason"), 10)]))
    return panels


def breakdown_means(column: pa.ChunkedArray) -> list[tuple[str, float]]:
    """Mean of each component of a JSON breakdown column. Rows share few
    distinct breakdowns, so each distinct text is parsed once."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for text, n in value_counts(column):
        try:
            parts = json.loads(text)
        except ValueError:
            continue
        for name, value in (parts.items() if isinstance(parts, dict) else ()):
            if isinstance(value, int | float):
                sums[name] = sums.get(name, 0.0) + float(value) * n
                counts[name] = counts.get(name, 0) + n
    return [(name, sums[name] / counts[name]) for name in sorted(sums)]
