"""Line charts as inline SVG (no plotting library): training reward and
inference-time scaling."""

import dataclasses
import html
import math
from typing import Optional, Sequence

import numpy as np

from score_jax.report import runs as runs_lib


@dataclasses.dataclass(frozen=True)
class Series:
  name: Optional[str]  # None: left out of the legend
  xs: Sequence[float]
  ys: Sequence[float] | np.ndarray
  color: str
  faint: bool = False
  dots: bool = False


WIDTH, HEIGHT = 600, 300
LEFT, RIGHT, TOP, BOTTOM = 58, 18, 40, 46


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
  """Round tick values (1, 2 or 5 times a power of ten apart) that cover
  [low, high].

  Args:
    low: the smallest value to cover.
    high: the largest; if not above `low`, [low - 0.5, high + 0.5] is
      covered instead.
    count: the step is the smallest round one that spans [low, high] in at
      most `count` steps; rounding the ends outwards may add a tick.

  Returns:
    The ticks, ascending, the first at most `low` and the last at least
    `high`.
  """
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


def line_chart(
  series: Sequence[Series],
  *,
  title: str,
  x_label: str,
  y_label: str,
  log2_x: bool = False,
  phases: Sequence[tuple[float, str]] = (),
) -> str:
  """An SVG line chart of `series`, with grid lines at round ticks.

  Args:
    series: the lines, drawn in order (a later one over an earlier); those
      with a name are in the legend.
    title: the chart's title.
    x_label: the x axis's label.
    y_label: the y axis's label.
    log2_x: whether x is on a log2 scale, ticks at powers of two.
    phases: (x, name) of each phase: a dashed line at each x but the
      first, and the name beside it.

  Returns:
    The <svg> element.
  """
  to_x = math.log2 if log2_x else float
  xs = [to_x(x) for s in series for x in s.xs] + [x for x, _ in phases]
  ys = [y for s in series for y in s.ys]
  if log2_x:
    x_ticks = list(range(math.floor(min(xs)), math.ceil(max(xs)) + 1))
    x_tick_text = [str(2**t) for t in x_ticks]
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

  parts = [
    f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
    f'width="{WIDTH}" height="{HEIGHT}" role="img" '
    f'aria-label="{html.escape(title)}">',
    f'<text x="{LEFT}" y="16" class="title">{html.escape(title)}</text>',
  ]
  for tick, text in zip(x_ticks, x_tick_text):
    x = px(tick)
    parts.append(
      f'<line class="grid" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" '
      f'y2="{HEIGHT - BOTTOM}"/><text class="tick" x="{x:.1f}" '
      f'y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">{text}'
      "</text>"
    )
  for tick in y_ticks:
    y = py(tick)
    parts.append(
      f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" '
      f'y1="{y:.1f}" y2="{y:.1f}"/><text class="tick" '
      f'x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
      f"{_tick_text(tick)}</text>"
    )
  parts.append(
    f'<line class="axis" x1="{LEFT}" x2="{LEFT}" y1="{TOP}" '
    f'y2="{HEIGHT - BOTTOM}"/><line class="axis" x1="{LEFT}" '
    f'x2="{WIDTH - RIGHT}" y1="{HEIGHT - BOTTOM}" y2="{HEIGHT - BOTTOM}"/>'
    f'<text class="label" x="{(LEFT + WIDTH - RIGHT) / 2}" '
    f'y="{HEIGHT - 8}" text-anchor="middle">{html.escape(x_label)}</text>'
    f'<text class="label" transform="translate(14 '
    f'{(TOP + HEIGHT - BOTTOM) / 2}) rotate(-90)" text-anchor="middle">'
    f"{html.escape(y_label)}</text>"
  )
  for index, (x, name) in enumerate(phases):
    if index:
      parts.append(
        f'<line class="phase" x1="{px(x):.1f}" x2="{px(x):.1f}" '
        f'y1="{TOP}" y2="{HEIGHT - BOTTOM}"/>'
      )
    parts.append(
      f'<text class="phase-name" x="{px(x) + 3:.1f}" '
      f'y="{TOP + 11}">{html.escape(name)}</text>'
    )
  for s in series:
    points = " ".join(
      f"{px(to_x(x)):.1f},{py(y):.1f}" for x, y in zip(s.xs, s.ys)
    )
    opacity = ' stroke-opacity="0.25"' if s.faint else ""
    parts.append(
      f'<polyline fill="none" stroke="{s.color}" '
      f'stroke-width="{1 if s.faint else 2}"{opacity} '
      f'points="{points}"/>'
    )
    if s.dots:
      parts += [
        f'<circle cx="{px(to_x(x)):.1f}" cy="{py(y):.1f}" r="3" '
        f'fill="{s.color}"/>'
        for x, y in zip(s.xs, s.ys)
      ]
  parts.append(_legend([s for s in series if s.name]))
  return "".join(parts) + "</svg>"


def _legend(series: Sequence[Series]) -> str:
  parts, x = [], LEFT
  for s in series:
    parts.append(
      f'<line x1="{x}" x2="{x + 18}" y1="28" y2="28" '
      f'stroke="{s.color}" stroke-width="2"/><text class="legend" '
      f'x="{x + 22}" y="32">{html.escape(s.name)}</text>'
    )
    x += 40 + 7 * len(s.name)
  return "".join(parts)


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
  """A moving average of `values`: at each point the mean of the `window`
  (odd) points centred on it, of fewer at the ends.

  Args:
    values: the series, e.g. one number per training step.
    window: how many points each mean is over.

  Returns:
    float64, an average per value.
  """
  kernel = np.ones(window)
  values = np.asarray(values, np.float64)
  return np.convolve(values, kernel, "same") / np.convolve(
    np.ones_like(values), kernel, "same"
  )


def phase_starts(training: Sequence[dict]) -> list[tuple[float, str]]:
  """(x, phase) where each run of equal phases begins; the boundary is drawn
  between the last step of one phase and the first of the next."""
  starts = []
  for previous, record in zip([None] + list(training), training):
    if previous is None or record.get("phase") != previous.get("phase"):
      x = record["step"] - (0.5 if previous is not None else 0)
      starts.append((x, str(record.get("phase", "?"))))
  return starts


def training_chart(run: runs_lib.Run) -> Optional[str]:
  """The chart of a run's mean reward of attempts 1 and 2 per training
  step: each faint, under its moving average over an odd window of about a
  twentieth of its points, phases marked. None if no training record has a
  finite reward_t1 or reward_t2."""
  colors = {"reward_t1": "#1f6fb4", "reward_t2": "#d9480f"}
  raw, smoothed = [], []
  for key, color in colors.items():
    points = [
      (r["step"], r[key])
      for r in run.training
      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]
    if not points:
      continue
    steps, values = zip(*points)
    window = max(1, len(values) // 20) | 1
    raw.append(Series(None, steps, values, color, faint=True))
    smoothed.append(
      Series(
        f"attempt {key[-1]} (moving average of {window})",
        steps,
        moving_average(values, window),
        color,
      )
    )
  if not raw:
    return None
  # Every raw series first, so that no smoothed line is drawn under one.
  return line_chart(
    raw + smoothed,
    title=f"{run.name}: training reward",
    x_label="training step",
    y_label="mean reward",
    phases=phase_starts(run.training),
  )


def scaling_chart(run: runs_lib.Run, evaluation: runs_lib.Evaluation) -> str:
  """The inference-time scaling chart of an evaluation with scaling.json:
  majority-vote accuracy against the budget n, of n first attempts and of
  n/2 attempts each corrected once.

  Args:
    run: the run, naming the chart.
    evaluation: its evaluation at one step, `scaling` not None.

  Returns:
    The <svg> element.
  """
  scaling = evaluation.scaling
  details = ", ".join(
    text.format(scaling[key])
    for key, text in (
      ("temperature", "temperature {}"),
      ("num_examples", "{} problems"),
    )
    if key in scaling
  )
  series = [
    Series(
      "majority of n first attempts",
      scaling["n"],
      scaling["majority_of_first_attempts"],
      "#1f6fb4",
      dots=True,
    ),
    Series(
      "majority of n/2 attempts, each corrected once",
      scaling["n"],
      scaling["majority_of_corrected_attempts"],
      "#d9480f",
      dots=True,
    ),
  ]
  return line_chart(
    series,
    title=f"{run.name} step {evaluation.step}"
    + (f" ({details})" if details else ""),
    x_label="samples per problem (n)",
    y_label="accuracy",
    log2_x=True,
  )
