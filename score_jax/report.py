"""An HTML report of a run directory or a results root of runs.

  python -m score_jax.report DIR      # writes DIR/report.html, prints its path

A run directory is a training workdir: metrics.jsonl (per training step) and
eval/<step>/ with metrics.json, transcripts.jsonl and optionally scaling.json.
A results root holds runs as immediate subdirectories (and may be a run itself).

The report has the comparison table in PAPER.md's format (Accuracy@t1,
Accuracy@t2, Delta, Delta i->c, Delta c->i) with 95% confidence intervals,
plots of attempt-1 and attempt-2 training reward and of the inference-time
scaling curves (inline SVG, no plotting library), and transcripts of attempt 1
and attempt 2 side by side with the changed lines highlighted.

Intervals come from the per-problem rewards in transcripts.jsonl, not from
metrics.json (whose numbers are checked against them; a disagreement is
flagged): Wilson score intervals for the proportions, and for Delta a paired
interval mean(d) +- 1.96 sd(d) / sqrt(n) with d = r2 - r1 per problem. Pairing
matters: both attempts answer the same problems, so Delta varies far less than
two independent accuracies would suggest.
"""

import argparse
import collections
import dataclasses
import difflib
import html
import itertools
import json
import math
import os
import sys
from typing import Iterator, Optional, Sequence

import numpy as np

from score_jax import files
from score_jax import metrics as metrics_lib

Z_95 = 1.96
TRANSCRIPTS_SHOWN = 8
# Run-directory names in the paper's row order: Base, the baselines, SCoRe,
# then its ablations; any other run follows, alphabetically.
METHOD_ORDER = ("base", "self_refine", "star", "pair_sft", "score",
                "no_stage1", "no_shaping", "single_turn")
COLUMNS = (("accuracy_t1", "Accuracy@t1"), ("accuracy_t2", "Accuracy@t2"),
           ("delta", "Δ(t1,t2)"), ("delta_i_to_c", "Δi→c"),
           ("delta_c_to_i", "Δc→i"))
OUTCOMES = {(False, True): "i→c", (True, False): "c→i",
            (True, True): "c→c", (False, False): "i→i"}


class ReportError(Exception):
  """Bad input; the message says what is wrong and what to do."""


# ----------------------------------------------------------------- reading


@dataclasses.dataclass
class Evaluation:
  step: int
  metrics: dict  # eval/<step>/metrics.json; {} when absent
  transcripts: Optional[list[dict]]  # None when transcripts.jsonl is absent
  scaling: Optional[dict]


@dataclasses.dataclass
class Run:
  name: str
  path: str
  training: list[dict]  # metrics.jsonl, one record per step, by step
  evaluations: list[Evaluation]  # by step


def _read_text(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except (OSError, ValueError) as e:
    raise ReportError(f"cannot read {path}: {e}; check the file.") from e


def _parse(text: str, where: str, fix: str):
  try:
    return json.loads(text)
  except ValueError as e:
    raise ReportError(f"{where}: not valid JSON ({e}); {fix}.") from e


def _read_json_object(path: str) -> dict:
  fix = "rerun the evaluation or delete the file"
  value = _parse(_read_text(path), path, fix)
  if not isinstance(value, dict):
    raise ReportError(f"{path}: expected a JSON object; {fix}.")
  return value


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  """(line number, object) for each non-blank line."""
  for number, line in enumerate(_read_text(path).splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{path} line {number}"
    value = _parse(line, where, "fix or delete that line")
    if not isinstance(value, dict):
      raise ReportError(f"{where}: expected a JSON object; fix or delete "
                        "that line.")
    yield number, value


def read_training(path: str) -> list[dict]:
  records = {}
  for number, record in _read_jsonl(path):
    if not isinstance(record.get("step"), int):
      raise ReportError(f"{path} line {number}: no integer 'step'; fix or "
                        "delete that line.")
    # A resumed run logs the steps after its last checkpoint again; the later
    # record is the one the checkpoint history continues from.
    records[record["step"]] = record
  return [records[step] for step in sorted(records)]


def read_transcripts(path: str) -> list[dict]:
  transcripts = []
  for number, t in _read_jsonl(path):
    attempts, rewards = t.get("attempts"), t.get("rewards")
    if not (isinstance(attempts, list) and len(attempts) >= 2
            and all(isinstance(a, str) for a in attempts)
            and isinstance(rewards, list) and len(rewards) >= 2
            and all(isinstance(r, (int, float)) for r in rewards)):
      raise ReportError(f"{path} line {number}: needs 'attempts' (two or "
                        "more strings) and 'rewards' (as many numbers); "
                        "rerun the evaluation.")
    transcripts.append(t)
  if not transcripts:
    raise ReportError(f"{path} is empty; rerun the evaluation.")
  return transcripts


def _read_scaling(path: str) -> dict:
  scaling = _read_json_object(path)
  lists = [scaling.get(k) for k in ("n", "majority_of_first_attempts",
                                    "majority_of_corrected_attempts")]
  if not (all(isinstance(v, list) for v in lists)
          and len({len(v) for v in lists}) == 1 and lists[0]
          and all(isinstance(n, int) and n > 0 for n in lists[0])
          and all(isinstance(a, (int, float)) and math.isfinite(a)
                  for a in lists[1] + lists[2])):
    raise ReportError(f"{path}: needs lists 'n' (positive integers), "
                      "'majority_of_first_attempts' and "
                      "'majority_of_corrected_attempts' (numbers) of one "
                      "length; rerun the scaling evaluation.")
  return scaling


def read_evaluation(directory: str, step: int) -> Optional[Evaluation]:
  """The evaluation in eval/<step>/, or None if it has no results yet."""
  paths = {name: os.path.join(directory, name) for name in
           ("metrics.json", "transcripts.jsonl", "scaling.json")}
  exists = {name: os.path.isfile(path) for name, path in paths.items()}
  if not (exists["metrics.json"] or exists["transcripts.jsonl"]):
    return None
  return Evaluation(
      step=step,
      metrics=(_read_json_object(paths["metrics.json"])
               if exists["metrics.json"] else {}),
      transcripts=(read_transcripts(paths["transcripts.jsonl"])
                   if exists["transcripts.jsonl"] else None),
      scaling=(_read_scaling(paths["scaling.json"])
               if exists["scaling.json"] else None))


def _is_run(path: str) -> bool:
  return (os.path.isdir(os.path.join(path, "eval"))
          or os.path.isfile(os.path.join(path, "metrics.jsonl")))


def read_run(path: str) -> Run:
  eval_dir = os.path.join(path, "eval")
  steps = sorted(int(name) for name in (os.listdir(eval_dir)
                                        if os.path.isdir(eval_dir) else [])
                 if name.isdigit())
  evaluations = [read_evaluation(os.path.join(eval_dir, str(step)), step)
                 for step in steps]
  training_path = os.path.join(path, "metrics.jsonl")
  return Run(name=os.path.basename(os.path.abspath(path)), path=path,
             training=(read_training(training_path)
                       if os.path.isfile(training_path) else []),
             evaluations=[e for e in evaluations if e is not None])


def read_runs(directory: str) -> list[Run]:
  """The runs of a run directory or of a results root (which may be both)."""
  if not os.path.isdir(directory):
    raise ReportError(f"{directory} is not a directory; pass a run directory "
                      "(with eval/<step>/) or a results root whose "
                      "subdirectories are runs.")
  subdirectories = sorted(os.path.join(directory, name)
                          for name in os.listdir(directory))
  paths = ([directory] if _is_run(directory) else []) + [
      p for p in subdirectories if os.path.isdir(p) and _is_run(p)]
  runs = [read_run(path) for path in paths]
  if not any(run.evaluations for run in runs):
    raise ReportError(f"no eval results under {directory}: expected "
                      "eval/<step>/metrics.json in it or in its "
                      "subdirectories; evaluate first (python -m "
                      "score_jax.main --mode=eval --workdir=...).")
  return runs


# -------------------------------------------------------------- statistics


@dataclasses.dataclass(frozen=True)
class Estimate:
  value: float
  low: Optional[float] = None  # None: no interval (no transcripts, or n < 2)
  high: Optional[float] = None

  def excludes_zero(self) -> bool:
    return self.low is not None and (self.low > 0 or self.high < 0)


def wilson_interval(successes: int, n: int, z: float = Z_95
                    ) -> tuple[float, float]:
  """The Wilson score interval: every p that a score test at level z accepts;
  unlike the normal interval it stays inside [0, 1] and is not empty at 0/n."""
  p = successes / n
  shrink = 1 + z * z / n
  center = (p + z * z / (2 * n)) / shrink
  half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
  # Clipped only against rounding at p = 0 or 1.
  return max(0.0, center - half), min(1.0, center + half)


def paired_difference(r1: np.ndarray, r2: np.ndarray,
                      z: float = Z_95) -> Estimate:
  """mean(d) +- z sd(d) / sqrt(n) for d = r2 - r1, sd with n - 1 dof."""
  d = r2.astype(np.float64) - r1.astype(np.float64)
  mean = float(d.mean())
  if d.size < 2:
    return Estimate(mean)
  half = z * float(d.std(ddof=1)) / math.sqrt(d.size)
  return Estimate(mean, mean - half, mean + half)


def estimates_from_rewards(reward_t1, reward_t2) -> dict[str, Estimate]:
  """Every column of the table with its interval, from per-problem rewards."""
  r1 = np.asarray(reward_t1, np.float64) > 0.5
  r2 = np.asarray(reward_t2, np.float64) > 0.5
  points = metrics_lib.self_correction(r1, r2)
  counts = {"accuracy_t1": r1.sum(), "accuracy_t2": r2.sum(),
            "delta_i_to_c": (~r1 & r2).sum(), "delta_c_to_i": (r1 & ~r2).sum()}
  result = {key: Estimate(points[key], *wilson_interval(int(c), r1.size))
            for key, c in counts.items()}
  result["delta"] = paired_difference(r1, r2)
  return result


def disagreements(metrics: dict, estimates: dict[str, Estimate], n: int,
                  step: int) -> list[str]:
  """Where metrics.json differs from what its transcripts give."""
  notes = []
  for key, estimate in estimates.items():
    if key not in metrics:
      continue
    value = metrics[key]
    if not isinstance(value, (int, float)):
      notes.append(f"metrics.json {key} is {value!r}, not a number")
    elif not abs(value - estimate.value) <= 1e-6:  # NaN disagrees too
      notes.append(f"metrics.json {key} = {value:.4f} but the transcripts "
                   f"give {estimate.value:.4f}")
  if "num_examples" in metrics and metrics["num_examples"] != n:
    notes.append(f"metrics.json num_examples = {metrics['num_examples']!r} "
                 f"but transcripts.jsonl has {n} problems")
  if "step" in metrics and metrics["step"] != step:
    notes.append(f"metrics.json step = {metrics['step']!r} in eval/{step}/")
  return notes


# ------------------------------------------------------------------- rows


@dataclasses.dataclass
class Row:
  label: str
  run: str
  step: int
  n: Optional[int]
  estimates: dict[str, Estimate]
  warnings: list[str]
  is_base: bool


def _label(run: Run, evaluation: Evaluation) -> str:
  label = evaluation.metrics.get("label")
  if isinstance(label, str) and label:
    return label
  if evaluation.step == 0:
    return "Base"
  trained_steps = [e.step for e in run.evaluations if e.step]
  return run.name + (f"@{evaluation.step}" if len(trained_steps) > 1 else "")


def _row(run: Run, evaluation: Evaluation) -> Row:
  where = f"{run.name} eval/{evaluation.step}"
  if evaluation.transcripts is not None:
    transcripts = evaluation.transcripts
    estimates = estimates_from_rewards([t["rewards"][0] for t in transcripts],
                                       [t["rewards"][1] for t in transcripts])
    n = len(transcripts)
    warnings = disagreements(evaluation.metrics, estimates, n,
                             evaluation.step)
  else:
    missing = [key for key, _ in COLUMNS
               if not isinstance(evaluation.metrics.get(key), (int, float))]
    if missing:
      raise ReportError(f"{run.path}/eval/{evaluation.step}/metrics.json has "
                        f"no number for {', '.join(missing)} and there is no "
                        "transcripts.jsonl; rerun the evaluation.")
    estimates = {key: Estimate(float(evaluation.metrics[key]))
                 for key, _ in COLUMNS}
    n = evaluation.metrics.get("num_examples")
    warnings = ["no transcripts.jsonl, so no confidence intervals"]
  skipped = skipped_steps(run.training, evaluation.step)
  if skipped:
    warnings.append(skipped_note(skipped, evaluation.step))
  label = _label(run, evaluation)
  return Row(label=label, run=run.name, step=evaluation.step, n=n,
             estimates=estimates, warnings=[f"{where}: {w}" for w in warnings],
             is_base=label == "Base")


def skipped_steps(training: Sequence[dict], until: int) -> int:
  """How many of the training steps up to `until` the train step refused
  (non-finite, or an update over config.max_update_ratio)."""
  return sum(bool(r.get("skipped")) for r in training if r["step"] <= until)


def skipped_note(skipped: int, steps: int) -> str:
  return (f"{skipped} of its {steps} training steps were skipped (non-finite "
          "or oversized updates: 'skipped' in metrics.jsonl)")


def _order(row: Row) -> tuple:
  name = row.run.lower().replace("-", "_").replace(" ", "_")
  rank = METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)
  return (not row.is_base, rank, name, row.step)


def comparison_rows(runs: Sequence[Run]) -> list[Row]:
  """One row per evaluated (run, step), in the paper's order."""
  rows = sorted((_row(run, e) for run in runs for e in run.evaluations),
                key=_order)
  # Two runs that both evaluated their base model give two "Base" rows.
  uses = collections.Counter(row.label for row in rows)
  for row in rows:
    if uses[row.label] > 1:
      row.label = f"{row.label} ({row.run})"
  return rows


# ------------------------------------------------------------------- plots


@dataclasses.dataclass(frozen=True)
class Series:
  name: Optional[str]  # None: left out of the legend
  xs: Sequence[float]
  ys: Sequence[float]
  color: str
  faint: bool = False
  dots: bool = False


WIDTH, HEIGHT = 600, 300
LEFT, RIGHT, TOP, BOTTOM = 58, 18, 40, 46


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
  """Round tick values (1, 2 or 5 times a power of ten apart) that cover
  [low, high]."""
  if high <= low:
    low, high = low - 0.5, high + 0.5
  raw = (high - low) / count
  magnitude = 10 ** math.floor(math.log10(raw))
  step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
  first, last = math.floor(low / step), math.ceil(high / step)
  # Rounded so that 0.1 * 3 prints as 0.3.
  return [round(i * step, 10) for i in range(first, last + 1)]


def _tick_text(value: float) -> str:
  return f"{value:g}".replace("-", "−")


def line_chart(series: Sequence[Series], *, title: str, x_label: str,
               y_label: str, log2_x: bool = False,
               phases: Sequence[tuple[float, str]] = ()) -> str:
  """An SVG line chart. `phases` are (x, name): a dashed line at each x but
  the first, and the name beside it."""
  to_x = math.log2 if log2_x else float
  xs = [to_x(x) for s in series for x in s.xs] + [x for x, _ in phases]
  ys = [y for s in series for y in s.ys]
  if log2_x:
    x_ticks = list(range(math.floor(min(xs)), math.ceil(max(xs)) + 1))
    x_tick_text = [str(2 ** t) for t in x_ticks]
  else:
    x_ticks = nice_ticks(min(xs), max(xs))
    x_tick_text = [_tick_text(t) for t in x_ticks]
  y_ticks = nice_ticks(min(ys), max(ys))

  def px(x):
    span = (x_ticks[-1] - x_ticks[0]) or 1
    return LEFT + (x - x_ticks[0]) / span * (WIDTH - LEFT - RIGHT)

  def py(y):
    span = y_ticks[-1] - y_ticks[0]
    return HEIGHT - BOTTOM - (y - y_ticks[0]) / span * (HEIGHT - TOP - BOTTOM)

  parts = [f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'width="{WIDTH}" height="{HEIGHT}" role="img" '
           f'aria-label="{html.escape(title)}">',
           f'<text x="{LEFT}" y="16" class="title">{html.escape(title)}</text>']
  for tick, text in zip(x_ticks, x_tick_text):
    x = px(tick)
    parts.append(f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" '
                 f'y2="{HEIGHT - BOTTOM}"/><text class="tick" x="{x:.1f}" '
                 f'y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{text}'
                 "</text>")
  for tick in y_ticks:
    y = py(tick)
    parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
                 f'y1="{y:.1f}" y2="{y:.1f}"/><text class="tick" '
                 f'x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                 f'{_tick_text(tick)}</text>')
  parts.append(
      f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" '
      f'y2="{HEIGHT - BOTTOM}"/><line class="axis" x1="{LEFT}" '
      f'x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}"/>'
      f'<text class="label" x="{(LEFT + WIDTH - RIGHT) / 2}" '
      f'y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
      f'<text class="label" transform="translate(14 '
      f'{(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
      f'{html.escape(y_label)}</text>')
  for index, (x, name) in enumerate(phases):
    if index:
      parts.append(f'<line class="phase" x1="{px(x):.1f}" x2="{px(x):.1f}" '
                   f'y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>')
    parts.append(f'<text class="phase-name" x="{px(x) + 3:.1f}" '
                 f'y="{TOP + 11}">{html.escape(name)}</text>')
  for s in series:
    points = " ".join(f"{px(to_x(x)):.1f},{py(y):.1f}"
                      for x, y in zip(s.xs, s.ys))
    opacity = ' stroke-opacity="0.25"' if s.faint else ""
    parts.append(f'<polyline fill="none" stroke="{s.color}" '
                 f'stroke-width="{1 if s.faint else 2}"{opacity} '
                 f'points="{points}"/>')
    if s.dots:
      parts += [f'<circle cx="{px(to_x(x)):.1f}" cy="{py(y):.1f}" r="3" '
                f'fill="{s.color}"/>' for x, y in zip(s.xs, s.ys)]
  parts.append(_legend([s for s in series if s.name]))
  return "".join(parts) + "</svg>"


def _legend(series: Sequence[Series]) -> str:
  parts, x = [], LEFT
  for s in series:
    parts.append(f'<line x1="{x}" x2="{x + 18}" y1="28" y2="28" '
                 f'stroke="{s.color}" stroke-width="2"/><text class="legend" '
                 f'x="{x + 22}" y="32">{html.escape(s.name)}</text>')
    x += 40 + 7 * len(s.name)
  return "".join(parts)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
  """A centred mean over `window` (odd) points, over fewer at the ends."""
  kernel = np.ones(window)
  values = np.asarray(values, np.float64)
  return (np.convolve(values, kernel, "same")
          / np.convolve(np.ones_like(values), kernel, "same"))


def phase_starts(training: Sequence[dict]) -> list[tuple[float, str]]:
  """(x, phase) where each run of equal phases begins; the boundary is drawn
  between the last step of one phase and the first of the next."""
  starts = []
  for previous, record in zip([None] + list(training), training):
    if previous is None or record.get("phase") != previous.get("phase"):
      x = record["step"] - (0.5 if previous is not None else 0)
      starts.append((x, str(record.get("phase", "?"))))
  return starts


def training_chart(run: Run) -> Optional[str]:
  colors = {"reward_t1": "#1f6fb4", "reward_t2": "#d9480f"}
  raw, smoothed = [], []
  for key, color in colors.items():
    points = [(r["step"], r[key]) for r in run.training
              if isinstance(r.get(key), (int, float))
              and math.isfinite(r[key])]
    if not points:
      continue
    steps, values = zip(*points)
    window = max(1, len(values) // 20) | 1
    raw.append(Series(None, steps, values, color, faint=True))
    smoothed.append(Series(f"attempt {key[-1]} (moving average of {window})",
                           steps, moving_average(values, window), color))
  if not raw:
    return None
  # Every raw series first, so that no smoothed line is drawn under one.
  return line_chart(raw + smoothed, title=f"{run.name}: training reward",
                    x_label="training step", y_label="mean reward",
                    phases=phase_starts(run.training))


def scaling_chart(run: Run, evaluation: Evaluation) -> str:
  scaling = evaluation.scaling
  details = ", ".join(text.format(scaling[key]) for key, text in
                      (("temperature", "temperature {}"),
                       ("num_examples", "{} problems")) if key in scaling)
  series = [
      Series("majority of n first attempts", scaling["n"],
             scaling["majority_of_first_attempts"], "#1f6fb4", dots=True),
      Series("majority of n/2 attempts, each corrected once", scaling["n"],
             scaling["majority_of_corrected_attempts"], "#d9480f", dots=True)]
  return line_chart(series, title=f"{run.name} step {evaluation.step}"
                    + (f" ({details})" if details else ""),
                    x_label="samples per problem (n)", y_label="accuracy",
                    log2_x=True)


# ------------------------------------------------------------- transcripts


def _outcome(transcript: dict) -> str:
  r1, r2 = transcript["rewards"][:2]
  return OUTCOMES[(r1 > 0.5, r2 > 0.5)]


def pick_transcripts(transcripts: Sequence[dict],
                     limit: int = TRANSCRIPTS_SHOWN) -> list[dict]:
  """i->c and c->i cases alternately (they show what self-correction does),
  then the rest, in file order."""
  fixed = [t for t in transcripts if _outcome(t) == "i→c"]
  broken = [t for t in transcripts if _outcome(t) == "c→i"]
  changed = [t for pair in itertools.zip_longest(fixed, broken)
             for t in pair if t is not None]
  unchanged = [t for t in transcripts if _outcome(t) in ("c→c", "i→i")]
  return (changed + unchanged)[:limit]


def _diff_cell(line: Optional[str], css_class: str) -> str:
  if line is None:
    return '<td class="empty"></td>'
  return f'<td class="{css_class}">{html.escape(line)}</td>'


def side_by_side(first: str, second: str) -> str:
  """Table rows pairing the lines of two attempts; lines that a line diff
  changes are class "removed" (attempt 1) and "added" (attempt 2)."""
  left, right = first.splitlines(), second.splitlines()
  matcher = difflib.SequenceMatcher(None, left, right, autojunk=False)
  rows = []
  for tag, i1, i2, j1, j2 in matcher.get_opcodes():
    changed = tag != "equal"
    for a, b in itertools.zip_longest(left[i1:i2], right[j1:j2]):
      rows.append("<tr>" + _diff_cell(a, "removed" if changed else "same")
                  + _diff_cell(b, "added" if changed else "same") + "</tr>")
  return "".join(rows)


def _attempt_heading(transcript: dict, attempt: int) -> str:
  reward = transcript["rewards"][attempt]
  answers = transcript.get("answers") or []
  answer = answers[attempt] if attempt < len(answers) else None
  mark = "✓" if reward > 0.5 else "✗"
  return (f"Attempt {attempt + 1} {mark} (reward {reward:g}, answer "
          f"{html.escape(str(answer))})")


def transcript_card(transcript: dict) -> str:
  outcome = _outcome(transcript)
  badge = {"i→c": "good", "c→i": "bad"}.get(outcome, "")
  return (
      f'<div class="card"><div class="meta"><span class="badge {badge}">'
      f'{outcome}</span> reference: <code>'
      f'{html.escape(str(transcript.get("reference", "")))}</code></div>'
      f'<pre class="problem">{html.escape(str(transcript.get("problem", "")))}'
      f'</pre><table class="diff"><thead><tr>'
      f'<th>{_attempt_heading(transcript, 0)}</th>'
      f'<th>{_attempt_heading(transcript, 1)}</th></tr></thead><tbody>'
      f'{side_by_side(transcript["attempts"][0], transcript["attempts"][1])}'
      "</tbody></table></div>")


def transcripts_section(run: Run) -> str:
  final = next((e for e in reversed(run.evaluations) if e.transcripts), None)
  if final is None:
    return ""
  counts = {o: sum(_outcome(t) == o for t in final.transcripts)
            for o in OUTCOMES.values()}
  shown = pick_transcripts(final.transcripts)
  summary = ", ".join(f"{o} {c}" for o, c in counts.items())
  return (f"<h3>{html.escape(run.name)}, step {final.step}</h3>"
          f'<p class="note">{len(shown)} of {len(final.transcripts)} problems '
          f"({summary}); i→c and c→i first.</p>"
          + "".join(transcript_card(t) for t in shown))


# ------------------------------------------------------------------- page


def _percent(x: float, signed: bool) -> str:
  return (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}").replace("-", "−")


def _cell(key: str, estimate: Estimate) -> str:
  signed = key == "delta"
  text = _percent(estimate.value, signed)
  if estimate.low is not None:
    text += (f' <span class="ci">[{_percent(estimate.low, signed)}, '
             f'{_percent(estimate.high, signed)}]</span>')
  if signed and estimate.excludes_zero():
    return f'<td class="significant">{text}*</td>'
  return f"<td>{text}</td>"


def table_html(rows: Sequence[Row]) -> str:
  header = "".join(f"<th>{name}</th>" for _, name in COLUMNS)
  body = []
  for row in rows:
    flag = (f' <span class="flag" title="{html.escape("; ".join(row.warnings))}'
            '">⚠</span>' if row.warnings else "")
    body.append(f"<tr><th>{html.escape(row.label)}{flag}</th>"
                + "".join(_cell(key, row.estimates[key]) for key, _ in COLUMNS)
                + f'<td>{row.n if row.n is not None else "?"}</td></tr>')
  return (f'<table class="results"><thead><tr><th>method</th>{header}'
          f'<th>n</th></tr></thead><tbody>{"".join(body)}</tbody></table>'
          '<p class="note">Percent of all problems, with 95% intervals from '
          "the per-problem rewards: Wilson score intervals for the accuracies, "
          "Δi→c and Δc→i; for Δ the paired interval mean(d) ± "
          "1.96·sd(d)/√n with d = r2 − r1 per problem. * Δ's interval "
          "excludes 0.</p>")


def markdown_cell(estimate: Estimate, signed: bool) -> str:
  """Percent with the interval; a difference (`signed`) whose interval
  excludes 0 in bold."""
  text = _percent(estimate.value, signed)
  if estimate.low is not None:
    text += (f" [{_percent(estimate.low, signed)}, "
             f"{_percent(estimate.high, signed)}]")
  return f"**{text}**" if signed and estimate.excludes_zero() else text


def table_markdown(rows: Sequence[Row]) -> str:
  """The comparison table as Markdown (README "Results"), same cells."""
  lines = ["| method | " + " | ".join(name for _, name in COLUMNS) + " | n |",
           "|---" * (len(COLUMNS) + 2) + "|"]
  for row in rows:
    lines.append(f"| {row.label} | " + " | ".join(
        markdown_cell(row.estimates[key], key == "delta")
        for key, _ in COLUMNS)
                 + f" | {row.n if row.n is not None else '?'} |")
  return "\n".join(lines) + "\n"


def standalone_svg(chart: str) -> str:
  """A chart of the report as an SVG file of its own (its styles inside)."""
  style = "".join(line for line in CSS.splitlines(keepends=True)
                  if line.startswith("svg"))
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


def render(directory: str, runs: Sequence[Run], rows: Sequence[Row]) -> str:
  warnings = [w for row in rows for w in row.warnings]
  training = [c for c in map(training_chart, runs) if c]
  scaling = [scaling_chart(run, e) for run in runs for e in run.evaluations
             if e.scaling]
  sections = [
      "<h2>Comparison</h2>" + table_html(rows),
      ("<h2>Training reward</h2><div class=\"charts\">" + "".join(training)
       + "</div>") if training else "",
      ("<h2>Inference-time scaling</h2><div class=\"charts\">"
       + "".join(scaling) + "</div>") if scaling else "",
      "<h2>Transcripts</h2>" + "".join(map(transcripts_section, runs))]
  warning_box = ('<div class="warnings"><b>Check these:</b><ul>'
                 + "".join(f"<li>{html.escape(w)}</li>" for w in warnings)
                 + "</ul></div>") if warnings else ""
  return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
          "<title>SCoRe report</title><style>" + CSS + "</style></head><body>"
          f"<h1>SCoRe report</h1><p class=\"note\">"
          f"{html.escape(os.path.abspath(directory))}</p>" + warning_box
          + "".join(sections) + "</body></html>\n")


def _write_atomic(path: str, text: str) -> None:
  try:
    files.write_atomic(path, text)
  except OSError as e:
    raise ReportError(f"cannot write {path}: {e.strerror}; check the "
                      "directory's permissions and free space.") from e


def write_report(directory: str) -> tuple[str, list[str]]:
  """Writes DIRECTORY/report.html, the table as DIRECTORY/results.md and
  each run's training chart as DIRECTORY/plots/<run>_training.svg; returns
  the report's path and the warnings."""
  runs = read_runs(directory)
  rows = comparison_rows(runs)
  path = os.path.join(directory, "report.html")
  _write_atomic(path, render(directory, runs, rows))
  _write_atomic(os.path.join(directory, "results.md"), table_markdown(rows))
  for run in runs:
    chart = training_chart(run)
    if chart is not None:
      _write_atomic(os.path.join(directory, "plots",
                                 f"{run.name}_training.svg"),
                    standalone_svg(chart))
  return path, [w for row in rows for w in row.warnings]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m score_jax.report",
      description="Writes DIR/report.html: the comparison table with 95% "
      "intervals, training and scaling plots, and transcripts.")
  parser.add_argument("directory", metavar="DIR",
                      help="a run directory or a results root of runs")
  args = parser.parse_args(argv)
  try:
    path, warnings = write_report(args.directory)
  except ReportError as e:
    message = str(e).replace("\n", " ")  # one line, whatever the cause said
    print(f"score_jax.report: error: {message}", file=sys.stderr)
    return 1
  for warning in warnings:
    print(f"score_jax.report: warning: {warning}", file=sys.stderr)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
