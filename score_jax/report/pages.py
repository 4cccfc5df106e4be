"""The report page and the files that write_report writes."""

import html
import os
from typing import Sequence

from score_jax import files
from score_jax.report import charts, table, transcripts
from score_jax.report import runs as runs_lib


def standalone_svg(chart: str) -> str:
  """A chart of the report as an SVG file of its own (its styles inside)."""
  style = "".join(
    line for line in CSS.splitlines(keepends=True) if line.startswith("svg")
  )
  chart = chart.replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1)
  return chart.replace(">", f"><style>{style}</style>", 1)


CSS = """
body{font:15px/1.45 system-ui,-apple-system,sans-serif;color:#222;
  max-width:1240px;margin:2rem auto;padding:0 1rem}
h1{margin-bottom:.2rem} h2{margin-top:2.2rem;border-bottom:1px solid #ddd}
.note{color:#666;font-size:.9em}
table.results{border-collapse:collapse;font-variant-numeric:tabular-nums}
table.results th,table.results td{padding:.35rem .7rem;text-align:right;
  border-bottom:1px solid #eee}
table.results tbody th{text-align:left;font-weight:600}
.ci{color:#888;font-size:.85em}
td.significant{font-weight:700}
.flag{color:#b8860b;cursor:help}
.warnings{background:#fff6d9;border:1px solid #f0d98c;padding:.5rem 1rem;
  border-radius:6px}
.charts{display:flex;flex-wrap:wrap;gap:1rem}
svg.chart{background:#fff;border:1px solid #eee;border-radius:6px}
svg .title{font-weight:600;font-size:13px} svg .tick{font-size:11px;fill:#555}
svg .label{font-size:12px;fill:#333} svg .legend{font-size:11px}
svg .grid{stroke:#eee} svg .axis{stroke:#888}
svg .phase{stroke:#999;stroke-dasharray:4 3}
svg .phase-name{font-size:10px;fill:#777}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem .8rem;
  margin:1rem 0}
.meta{margin-bottom:.3rem}
.badge{display:inline-block;padding:0 .5rem;border-radius:9px;
  background:#eee;font-weight:600}
.badge.good{background:#d3f3d3} .badge.bad{background:#fbd5d3}
pre.problem{background:#f7f7f7;padding:.4rem .6rem;white-space:pre-wrap;
  margin:.3rem 0}
table.diff{width:100%;border-collapse:collapse;table-layout:fixed}
table.diff th{text-align:left;font-weight:600;padding:.2rem .4rem}
table.diff td{font:12.5px/1.4 ui-monospace,monospace;white-space:pre-wrap;
  word-break:break-word;vertical-align:top;padding:0 .4rem}
td.removed{background:#fde3e1} td.added{background:#dcf5dc}
td.empty{background:#f5f5f5}
"""


def render(
  directory: str, runs: Sequence[runs_lib.Run], rows: Sequence[table.Row]
) -> str:
  """The report page: the rows' warnings, the comparison table, the
  training and scaling charts (where there are any) and each run's
  transcripts.

  Args:
    directory: the directory reported on, shown under the title.
    runs: the runs read from it.
    rows: their comparison rows (`table.comparison_rows`).

  Returns:
    The page, one self-contained HTML document.
  """
  warnings = [w for row in rows for w in row.warnings]
  training = [c for c in map(charts.training_chart, runs) if c]
  scaling = [
    charts.scaling_chart(run, e)
    for run in runs
    for e in run.evaluations
    if e.scaling
  ]
  sections = [
    "<h2>Comparison</h2>" + table.table_html(rows),
    (
      '<h2>Training reward</h2><div class="charts">'
      + "".join(training)
      + "</div>"
    )
    if training
    else "",
    (
      '<h2>Inference-time scaling</h2><div class="charts">'
      + "".join(scaling)
      + "</div>"
    )
    if scaling
    else "",
    "<h2>Transcripts</h2>"
    + "".join(map(transcripts.transcripts_section, runs)),
  ]
  warning_box = (
    (
      '<div class="warnings"><b>Check these:</b><ul>'
      + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
      + "</ul></div>"
    )
    if warnings
    else ""
  )
  return (
    '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
    "<title>SCoRe report</title><style>" + CSS + "</style></head><body>"
    f'<h1>SCoRe report</h1><p class="note">'
    f"{html.escape(os.path.abspath(directory))}</p>"
    + warning_box
    + "".join(sections)
    + "</body></html>\n"
  )


def _write_atomic(path: str, text: str) -> None:
  try:
    files.write_atomic(path, text)
  except OSError as e:
    raise runs_lib.ReportError(
      f"cannot write {path}: {e.strerror}; check the directory's "
      "permissions and free space."
    ) from e


def write_report(directory: str) -> tuple[str, list[str]]:
  """Writes DIRECTORY/report.html, the table as DIRECTORY/results.md and
  each run's training chart as DIRECTORY/plots/<run>_training.svg; returns
  the report's path and the warnings."""
  runs = runs_lib.read_runs(directory)
  rows = table.comparison_rows(runs)
  path = os.path.join(directory, "report.html")
  _write_atomic(path, render(directory, runs, rows))
  _write_atomic(
    os.path.join(directory, "results.md"), table.table_markdown(rows)
  )
  for run in runs:
    chart = charts.training_chart(run)
    if chart is not None:
      _write_atomic(
        os.path.join(directory, "plots", f"{run.name}_training.svg"),
        standalone_svg(chart),
      )
  return path, [w for row in rows for w in row.warnings]
