"""Integrity records of a checkpoint: the sha256 of its files, written once
its save is committed by each process for the files it wrote, and checked
on resume by each process for its share.

Records: integrity.json is process 0's, and counts the processes that
saved the checkpoint (`num_processes`); integrity.process_<i>.json is
process i's. A record without a count is the only one and lists every file
(a checkpoint saved before records were per process, or adopted). Which
process wrote a file: Orbax's OCDBT layout puts a process's array data
under ocdbt.process_<i>/ and its array metadata in array_metadatas/
process_<i>; process 0 writes the rest. A process that resumes checks the
records of the saving processes i with i % (its process count) == (its
index): each reads back only a share, however many processes there are.
"""

import concurrent.futures
import hashlib
import json
import os
import re
from typing import Optional

import jax

from score_jax import files

RECORD = "integrity.json"
# Files hashed at once: reading and hashing release the GIL, and Cloud
# Storage FUSE reads several files faster than one.
HASH_THREADS = 8
_WRITER = re.compile(r"(?:^|\.)process_(\d+)$")


def write(directory: str, every_file: bool = False) -> None:
  """Writes this process's record of the checkpoint in `directory`: the
  sha256 of the files it wrote. With `every_file` (process 0 alone), one
  record of every file."""
  process, count = jax.process_index(), jax.process_count()
  if every_file:
    record = {"sha256": checksums(directory), "num_processes": 1}
  else:
    record = {
      "sha256": checksums(directory, lambda name: _writer(name) == process)
    }
    if process == 0:
      record["num_processes"] = count
  files.write_atomic(
    os.path.join(directory, _name(process)), json.dumps(record)
  )


def has_records(directory: str) -> bool:
  """Whether the checkpoint in `directory` has process 0's record."""
  return os.path.exists(os.path.join(directory, RECORD))


def damage(directory: str) -> Optional[str]:
  """Why this process's share of the checkpoint in `directory` is not
  intact (a record missing or unreadable, a file missing or changed), or
  None."""
  first = _read(directory, 0)
  if isinstance(first, str):
    return first
  writers = int(first.get("num_processes", 1))
  for process in range(jax.process_index(), writers, jax.process_count()):
    record = first if process == 0 else _read(directory, process)
    if isinstance(record, str):
      return record
    expected = record["sha256"]
    actual = checksums(directory, expected.__contains__)
    for name, digest in sorted(expected.items()):
      if name not in actual:
        return f"{os.path.join(directory, name)} is missing"
      if actual[name] != digest:
        return f"{os.path.join(directory, name)} differs from its checksum"
  return None


def checksums(directory: str, include=lambda name: True) -> dict[str, str]:
  """sha256 of the files under `directory` whose relative path `include`
  accepts (every file but the records), by relative path.

  Args:
    directory: a checkpoint's directory.
    include: whether to hash the file at a relative path (by default,
      every one).

  Returns:
    {relative path: hex sha256}, hashed on HASH_THREADS threads; the
    integrity records (`integrity.*`) left out.
  """
  names = []
  for root, _, found in os.walk(directory):
    for name in found:
      relative = os.path.relpath(os.path.join(root, name), directory)
      if not relative.startswith("integrity.") and include(relative):
        names.append(relative)
  with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
    digests = pool.map(lambda n: sha256(os.path.join(directory, n)), names)
    return dict(zip(names, digests))


def sha256(path: str) -> str:
  """The hex sha256 of the file at `path`, read in 4 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()


def _name(process: int) -> str:
  return RECORD if process == 0 else f"integrity.process_{process}.json"


def _read(directory: str, process: int):
  """Process `process`'s record of the checkpoint in `directory` (a dict),
  or why it cannot be used (a str)."""
  path = os.path.join(directory, _name(process))
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if not isinstance(record["sha256"], dict):
      raise TypeError("sha256 is not a mapping")
    return record
  except FileNotFoundError:
    if process == 0:
      return "it has no integrity record (an empty or unfinished save)"
    return (
      f"it has no integrity record of process {process} (a save "
      f"that process {process} did not finish)"
    )
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"its integrity record {path} is unreadable ({e})"


def _writer(name: str) -> int:
  """The process that wrote a checkpoint's file `name` (relative)."""
  for part in name.split(os.sep):
    match = _WRITER.search(part)
    if match:
      return int(match.group(1))
  return 0
