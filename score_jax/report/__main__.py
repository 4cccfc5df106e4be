"""python -m score_jax.report DIR: writes DIR/report.html, prints its path."""

import argparse
import sys
from typing import Optional, Sequence

from score_jax.report import pages
from score_jax.report import runs as runs_lib


def parser() -> argparse.ArgumentParser:
  """The command line's flags."""
  p = argparse.ArgumentParser(
    prog="python -m score_jax.report",
    description="Writes DIR/report.html: the comparison table with 95% "
    "intervals, training and scaling plots, and transcripts.",
  )
  p.add_argument(
    "directory", metavar="DIR", help="a run directory or a results root of runs"
  )
  return p


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Writes the report of the command line's DIR.

  Args:
    argv: the arguments (None: sys.argv's).

  Returns:
    The exit status: 0, or 1 when the report cannot be written.
  """
  args = parser().parse_args(argv)
  try:
    path, warnings = pages.write_report(args.directory)
  except runs_lib.ReportError as e:
    message = str(e).replace("\n", " ")  # one line, whatever the cause said
    print(f"score_jax.report: error: {message}", file=sys.stderr)
    return 1
  for warning in warnings:
    print(f"score_jax.report: warning: {warning}", file=sys.stderr)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
