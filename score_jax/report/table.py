"""The comparison table in the paper's format (its Table 2): one row per
evaluated run and step, in the paper's order, as HTML and as Markdown."""

import collections
import dataclasses
import html
from typing import Optional, Sequence

from score_jax.report import runs as runs_lib
from score_jax.report import stats

# Run-directory names in the paper's row order: Base, the baselines, SCoRe,
# then its ablations; any other run follows, alphabetically.
METHOD_ORDER = (
  "base",
  "self_refine",
  "star",
  "pair_sft",
  "score",
  "no_stage1",
  "no_shaping",
  "single_turn",
)
COLUMNS = (
  ("accuracy_t1", "Accuracy@t1"),
  ("accuracy_t2", "Accuracy@t2"),
  ("delta", "Δ(t1,t2)"),
  ("delta_i_to_c", "Δi→c"),
  ("delta_c_to_i", "Δc→i"),
)


@dataclasses.dataclass
class Row:
  label: str
  run: str
  step: int
  n: Optional[int]
  estimates: dict[str, stats.Estimate]
  warnings: list[str]
  is_base: bool


def _label(run: runs_lib.Run, evaluation: runs_lib.Evaluation) -> str:
  label = evaluation.metrics.get("label")
  if isinstance(label, str) and label:
    return label
  if evaluation.step == 0:
    return "Base"
  trained_steps = [e.step for e in run.evaluations if e.step]
  return run.name + (f"@{evaluation.step}" if len(trained_steps) > 1 else "")


def _row(run: runs_lib.Run, evaluation: runs_lib.Evaluation) -> Row:
  where = f"{run.name} eval/{evaluation.step}"
  if evaluation.transcripts is not None:
    transcripts = evaluation.transcripts
    estimates = stats.estimates_from_rewards(
      [t["rewards"][0] for t in transcripts],
      [t["rewards"][1] for t in transcripts],
    )
    n = len(transcripts)
    warnings = stats.disagreements(
      evaluation.metrics, estimates, n, evaluation.step
    )
  else:
    missing = [
      key
      for key, _ in COLUMNS
      if not isinstance(evaluation.metrics.get(key), (int, float))
    ]
    if missing:
      raise runs_lib.ReportError(
        f"{run.path}/eval/{evaluation.step}/metrics.json has no number "
        f"for {', '.join(missing)} and there is no transcripts.jsonl; "
        "rerun the evaluation."
      )
    estimates = {
      key: stats.Estimate(float(evaluation.metrics[key])) for key, _ in COLUMNS
    }
    n = evaluation.metrics.get("num_examples")
    warnings = ["no transcripts.jsonl, so no confidence intervals"]
  skipped = runs_lib.skipped_steps(run.training, evaluation.step)
  if skipped:
    warnings.append(runs_lib.skipped_note(skipped, evaluation.step))
  label = _label(run, evaluation)
  return Row(
    label=label,
    run=run.name,
    step=evaluation.step,
    n=n,
    estimates=estimates,
    warnings=[f"{where}: {w}" for w in warnings],
    is_base=label == "Base",
  )


def _order(row: Row) -> tuple:
  name = row.run.lower().replace("-", "_").replace(" ", "_")
  rank = METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)
  return (not row.is_base, rank, name, row.step)


def comparison_rows(runs: Sequence[runs_lib.Run]) -> list[Row]:
  """One row per evaluated (run, step), in the paper's order."""
  rows = sorted(
    (_row(run, e) for run in runs for e in run.evaluations), key=_order
  )
  # Two runs that both evaluated their base model give two "Base" rows.
  uses = collections.Counter(row.label for row in rows)
  for row in rows:
    if uses[row.label] > 1:
      row.label = f"{row.label} ({row.run})"
  return rows


def _percent(x: float, signed: bool) -> str:
  return (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}").replace("-", "−")


def _cell(key: str, estimate: stats.Estimate) -> str:
  signed = key == "delta"
  text = _percent(estimate.value, signed)
  if estimate.low is not None:
    text += (
      f' <span class="ci">[{_percent(estimate.low, signed)}, '
      f"{_percent(estimate.high, signed)}]</span>"
    )
  if signed and estimate.excludes_zero():
    return f'<td class="significant">{text}*</td>'
  return f"<td>{text}</td>"


def table_html(rows: Sequence[Row]) -> str:
  """The comparison table of `rows` as an HTML table and a note on its
  intervals: a percent with its interval per cell, a Δ whose interval
  excludes 0 marked *, a row with warnings flagged ⚠ (its title)."""
  header = "".join(f"<th>{name}</th>" for _, name in COLUMNS)
  body = []
  for row in rows:
    flag = (
      f' <span class="flag" title="{html.escape("; ".join(row.warnings))}'
      '">⚠</span>'
      if row.warnings
      else ""
    )
    body.append(
      f"<tr><th>{html.escape(row.label)}{flag}</th>"
      + "".join(_cell(key, row.estimates[key]) for key, _ in COLUMNS)
      + f"<td>{row.n if row.n is not None else '?'}</td></tr>"
    )
  return (
    f'<table class="results"><thead><tr><th>method</th>{header}'
    f"<th>n</th></tr></thead><tbody>{''.join(body)}</tbody></table>"
    '<p class="note">Percent of all problems, with 95% intervals from '
    "the per-problem rewards: Wilson score intervals for the accuracies, "
    "Δi→c and Δc→i; for Δ the paired interval mean(d) ± "
    "1.96·sd(d)/√n with d = r2 − r1 per problem. * Δ's interval "
    "excludes 0.</p>"
  )


def markdown_cell(estimate: stats.Estimate, signed: bool) -> str:
  """A Markdown cell: the percent with its interval; a difference
  (`signed`) whose interval excludes 0 in bold.

  Args:
    estimate: the value, a fraction, with its interval if any.
    signed: whether it is a difference, printed with its sign.

  Returns:
    The cell's text, e.g. "42.0 [38.9, 45.1]".
  """
  text = _percent(estimate.value, signed)
  if estimate.low is not None:
    text += (
      f" [{_percent(estimate.low, signed)}, {_percent(estimate.high, signed)}]"
    )
  return f"**{text}**" if signed and estimate.excludes_zero() else text


def table_markdown(rows: Sequence[Row]) -> str:
  """The comparison table as Markdown (README "Results"), same cells."""
  lines = [
    "| method | " + " | ".join(name for _, name in COLUMNS) + " | n |",
    "|---" * (len(COLUMNS) + 2) + "|",
  ]
  for row in rows:
    lines.append(
      f"| {row.label} | "
      + " | ".join(
        markdown_cell(row.estimates[key], key == "delta") for key, _ in COLUMNS
      )
      + f" | {row.n if row.n is not None else '?'} |"
    )
  return "\n".join(lines) + "\n"
