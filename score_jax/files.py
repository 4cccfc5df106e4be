"""Atomic file writes: a reader (or a crash) never sees half a file."""

import os


def write_atomic(path: str, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
