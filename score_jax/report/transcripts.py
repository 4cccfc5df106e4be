"""Transcripts of attempt 1 and attempt 2 side by side, the changed lines
highlighted; i->c and c->i cases first."""

import difflib
import html
import itertools
from typing import Optional, Sequence

from score_jax.report import runs as runs_lib

TRANSCRIPTS_SHOWN = 8
OUTCOMES = {
  (False, True): "i→c",
  (True, False): "c→i",
  (True, True): "c→c",
  (False, False): "i→i",
}


def _outcome(transcript: dict) -> str:
  r1, r2 = transcript["rewards"][:2]
  return OUTCOMES[(r1 > 0.5, r2 > 0.5)]


def pick_transcripts(
  transcripts: Sequence[dict], limit: int = TRANSCRIPTS_SHOWN
) -> list[dict]:
  """The transcripts to show: i->c and c->i cases alternately (they show
  what self-correction does), then the rest, each kind in file order.

  Args:
    transcripts: an evaluation's transcripts (their 'rewards' decide the
      case).
    limit: the most to pick.

  Returns:
    Up to `limit` of them, in that order.
  """
  fixed = [t for t in transcripts if _outcome(t) == "i→c"]
  broken = [t for t in transcripts if _outcome(t) == "c→i"]
  changed = [
    t
    for pair in itertools.zip_longest(fixed, broken)
    for t in pair
    if t is not None
  ]
  unchanged = [t for t in transcripts if _outcome(t) in ("c→c", "i→i")]
  return (changed + unchanged)[:limit]


def _diff_cell(line: Optional[str], css_class: str) -> str:
  if line is None:
    return '<td class="empty"></td>'
  return f'<td class="{css_class}">{html.escape(line)}</td>'


def side_by_side(first: str, second: str) -> str:
  """The lines of two attempts side by side, as a line diff pairs them.

  Args:
    first: attempt 1's text.
    second: attempt 2's text.

  Returns:
    HTML table rows of two cells, attempt 1's line and attempt 2's: class
    "same" where the diff keeps the line, "removed" and "added" where it
    changes it, "empty" where one side has no line.
  """
  left, right = first.splitlines(), second.splitlines()
  matcher = difflib.SequenceMatcher(None, left, right, autojunk=False)
  rows = []
  for tag, i1, i2, j1, j2 in matcher.get_opcodes():
    changed = tag != "equal"
    for a, b in itertools.zip_longest(left[i1:i2], right[j1:j2]):
      rows.append(
        "<tr>"
        + _diff_cell(a, "removed" if changed else "same")
        + _diff_cell(b, "added" if changed else "same")
        + "</tr>"
      )
  return "".join(rows)


def _attempt_heading(transcript: dict, attempt: int) -> str:
  reward = transcript["rewards"][attempt]
  answers = transcript.get("answers") or []
  answer = answers[attempt] if attempt < len(answers) else None
  mark = "✓" if reward > 0.5 else "✗"
  return (
    f"Attempt {attempt + 1} {mark} (reward {reward:g}, answer "
    f"{html.escape(str(answer))})"
  )


def transcript_card(transcript: dict) -> str:
  """One transcript as an HTML card: its case (i->c, ...), reference and
  problem, and attempts 1 and 2 side by side with their rewards and
  answers."""
  outcome = _outcome(transcript)
  badge = {"i→c": "good", "c→i": "bad"}.get(outcome, "")
  return (
    f'<div class="card"><div class="meta"><span class="badge {badge}">'
    f"{outcome}</span> reference: <code>"
    f"{html.escape(str(transcript.get('reference', '')))}</code></div>"
    f'<pre class="problem">{html.escape(str(transcript.get("problem", "")))}'
    f'</pre><table class="diff"><thead><tr>'
    f"<th>{_attempt_heading(transcript, 0)}</th>"
    f"<th>{_attempt_heading(transcript, 1)}</th></tr></thead><tbody>"
    f"{side_by_side(transcript['attempts'][0], transcript['attempts'][1])}"
    "</tbody></table></div>"
  )


def transcripts_section(run: runs_lib.Run) -> str:
  """The HTML of a run's transcripts in its last evaluation that has any:
  a heading, the count of each case, and the cards of `pick_transcripts`;
  "" if no evaluation has transcripts."""
  final = next((e for e in reversed(run.evaluations) if e.transcripts), None)
  if final is None:
    return ""
  counts = {
    o: sum(_outcome(t) == o for t in final.transcripts)
    for o in OUTCOMES.values()
  }
  shown = pick_transcripts(final.transcripts)
  summary = ", ".join(f"{o} {c}" for o, c in counts.items())
  return (
    f"<h3>{html.escape(run.name)}, step {final.step}</h3>"
    f'<p class="note">{len(shown)} of {len(final.transcripts)} problems '
    f"({summary}); i→c and c→i first.</p>"
    + "".join(transcript_card(t) for t in shown)
  )
