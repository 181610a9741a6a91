"""The report as one self-contained HTML page: figures embedded as base64
PNG, styles inline, no script and no external reference, so it opens
offline and can be mailed or archived as one file.

Every number a reader may want to check carries ``data-key`` (``rows``,
``status.ok``, ``tokens.total``, ``error.TimeoutError``, ``workflow.accuracy``
...), the name the report test compares with ``matrix-hpc inspect``.
"""

from __future__ import annotations

import base64
import datetime as dt
from html import escape
from typing import TYPE_CHECKING

from matrix_hpc.report.aggregate import Distribution, RoleLatency, Timeline
from matrix_hpc.report.figures import number

if TYPE_CHECKING:
    from matrix_hpc.report.build import Figure, ReportInput

MAX_ROWS = 10  # error kinds and filter reasons listed (as inspect lists them)
STYLE = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1100px;color:#212121}
h1{font-size:1.5em;margin-bottom:0}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}
.sub{color:#666;margin-top:4px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f5f5f5}
.grid{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0;border:1px solid #eee;padding:8px}
figure img{max-width:100%;height:auto;display:block}figcaption{color:#555;font-size:.9em;max-width:800px}
.warn{background:#fff3e0;border-left:4px solid #ef6c00;padding:6px 12px}
.ex{font-family:monospace;font-size:.85em;white-space:pre-wrap;word-break:break-word;max-width:700px}
"""


def render_page(inp: ReportInput, figs: list[Figure], tl: Timeline, latency: Distribution,
                roles: list[RoleLatency], generated: dt.datetime) -> str:
    title = f"matrix_hpc report: {inp.out_dir}"
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>{escape(title)}</h1><p class=sub>{escape(inp.workflow or 'workflow not recorded')} · generated "
             f"{generated:%Y-%m-%d %H:%M:%S} UTC · {len(inp.files)} part files</p>",
             _notes(inp), _overview(inp, tl, latency), "<h2>Figures</h2><div class=grid>",
             *(_figure(f) for f in figs), "</div>", _roles(roles), _errors(inp), _reasons(inp), _workflow(inp),
             "</body></html>"]
    return "\n".join(p for p in parts if p)


def _num(key: str, value: int | float | str) -> str:
    if isinstance(value, float):
        text = number(value)
    else:
        text = f"{value:,}" if isinstance(value, int) else value
    return f"<td class=n data-key=\"{escape(key)}\">{escape(text)}</td>"


def _notes(inp: ReportInput) -> str:
    s = inp.summary
    notes = list(inp.notes)
    if s.duplicate_ids:
        notes.append(f"{s.duplicate_ids} id(s) are present more than once (e.g. {', '.join(s.duplicate_examples)})")
    notes += [f"unreadable part file, not counted: {p}" for p in s.unreadable]
    return "".join(f"<p class=warn>{escape(n.strip())}</p>" for n in notes)


def _overview(inp: ReportInput, tl: Timeline, latency: Distribution) -> str:
    s, t = inp.summary, inp.totals
    n = max(s.rows, 1)
    span_s = float(tl.edges_s[-1]) if tl.by_status else 0.0
    rows = [("rows", "rows (all files, incl. _rejected/)", s.rows), ("distinct_ids", "distinct ids", s.distinct_ids),
            ("duplicate_ids", "ids present more than once", s.duplicate_ids)]
    status = sorted(s.by_status.items(), key=lambda kv: -kv[1])
    rows += [(f"status.{k}", f"status {k} ({v / n:.1%})", v) for k, v in status]
    rows += [("tokens.prompt", "prompt tokens", t.prompt_tokens),
             ("tokens.completion", "completion tokens", t.completion_tokens),
             ("tokens.total", "total tokens", t.prompt_tokens + t.completion_tokens),
             ("retried", "rows whose steps were retried", t.retried)]
    timing: list[tuple[str, str, int | float]] = [("span_s", "seconds from first admission to last finish",
                                                   round(span_s, 1))]
    if span_s > 0:
        timing += [("rows_per_s", "rows / s", round(s.rows / span_s, 2)),
                   ("tokens_per_s", "tokens / s", round((t.prompt_tokens + t.completion_tokens) / span_s, 1))]
    timing += [(f"latency.p{p}", f"task latency p{p} (s)", v) for p, v in latency.percentiles.items() if p >= 50]
    if tl.untimed:
        timing.append(("untimed", "rows without timestamps (not in the time figures)", tl.untimed))
    body = "".join(f"<tr><th>{escape(label)}</th>{_num(key, v)}</tr>" for key, label, v in rows)
    body2 = "".join(f"<tr><th>{escape(label)}</th>{_num(key, v)}</tr>" for key, label, v in timing)
    return (f"<h2>Counts (as <code>matrix-hpc inspect</code> reports them)</h2><table>{body}</table>"
            f"<h2>Timing</h2><table>{body2}</table>")


def _figure(f: Figure) -> str:
    data = base64.b64encode(f.png).decode()
    caption = escape(f.title) + (f" — {escape(f.caption)}" if f.caption else "")
    return (f"<figure id=\"fig-{escape(f.key)}\"><img alt=\"{escape(f.title)}\" "
            f"src=\"data:image/png;base64,{data}\"><figcaption>{caption}</figcaption></figure>")


def _roles(roles: list[RoleLatency]) -> str:
    if not roles:
        return ""
    head = "<tr><th>role</th><th>steps</th><th>mean s</th>" + "".join(
        f"<th>p{p} s</th>" for p in (50, 95, 99)) + "</tr>"
    body = "".join(f"<tr><th>{escape(r.role)}</th>{_num(f'role.{r.role}.steps', r.count)}"
                   f"{_num(f'role.{r.role}.mean_s', r.mean_s)}"
                   + "".join(_num(f"role.{r.role}.p{p}_s", r.percentiles_s[p]) for p in (50, 95, 99)) + "</tr>"
                   for r in roles)
    return f"<h2>Step latency per role</h2><table>{head}{body}</table>"


def _errors(inp: ReportInput) -> str:
    t = inp.totals
    if not t.errors:
        return "<h2>Error kinds</h2><p>No row has an error.</p>"
    body = "".join(f"<tr><th>{escape(k)}</th>{_num(f'error.{k}', v)}<td class=ex>{escape(t.examples[k][:500])}"
                   "</td></tr>" for k, v in t.errors.most_common(MAX_ROWS))
    return (f"<h2>Error kinds</h2><table><tr><th>error type</th><th>rows</th><th>example [id] error</th></tr>"
            f"{body}</table>")


def _reasons(inp: ReportInput) -> str:
    reasons = inp.totals.reasons
    if not reasons:
        return ""
    body = "".join(f"<tr><td class=ex>{escape(r[:300])}</td><td class=n>{v:,}</td></tr>"
                   for r, v in reasons.most_common(MAX_ROWS))
    return f"<h2>Filter reasons</h2><table><tr><th>reason</th><th>rows</th></tr>{body}</table>"


def _workflow(inp: ReportInput) -> str:
    if not inp.workflow_metrics:
        return ""
    body = "".join(f"<tr><th>{escape(k)}</th>{_num(f'workflow.{k}', v)}</tr>" for k, v in inp.workflow_metrics.items())
    return f"<h2>Workflow metrics ({escape(inp.workflow or '')})</h2><table>{body}</table>"
