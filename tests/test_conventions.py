"""The conventions docs/design.md states, held: modules import only the
layers above them, public functions document their arguments and returns,
every file the repository cites exists, and the shape legend is one."""

import ast
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "score_jax")

# docs/design.md's layers, top to bottom: a module imports only modules of
# its own layer or above.
LAYERS = [
  ("files", "multihost", "sharding", "device_timeline", "integrity", "metrics"),
  ("models", "tokenizer", "chat_template"),
  ("tasks",),
  ("objectives", "schedule"),
  ("episodes", "data", "sampling", "rollout", "packing"),
  (
    "train_step",
    "experiment",
    "generate",
    "checkpoints",
    "preemption",
    "host_failures",
    "writer",
  ),
  (
    "evaluate",
    "scaling",
    "train",
    "hlo_analysis",
    "projection",
    "aot",
    "report",
  ),
  ("main",),
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules():
  for root, _, names in os.walk(PACKAGE):
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        yield os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, "."), path


def _top(module: str) -> str:
  return module.split(".")[0]


def test_every_module_has_a_layer():
  assert {_top(m) for m, _ in _modules()} - {"__init__", "__main__"} <= set(
    LAYER
  )


@pytest.mark.parametrize("module, path", list(_modules()))
def test_imports_run_one_way(module, path):
  """The data flows down the layers; an import that runs back up would
  tangle them."""
  if _top(module) not in LAYER:
    return
  mine = LAYER[_top(module)]
  for node in ast.walk(ast.parse(open(path).read())):
    if (
      isinstance(node, ast.ImportFrom)
      and node.module
      and (node.module.startswith("score_jax"))
    ):
      parts = node.module.split(".")
      imported = [parts[1]] if len(parts) > 1 else [a.name for a in node.names]
      for name in imported:
        assert LAYER[name] <= mine or name == _top(module), (
          f"{module} (layer {mine}) imports {name} (layer {LAYER[name]})"
        )


def _public_functions(path):
  """(qualified name, node) of the public functions and methods, not the
  nested ones."""
  tree = ast.parse(open(path).read())
  for node in tree.body:
    if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
      yield node.name, node
    if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
      for item in node.body:
        if isinstance(item, ast.FunctionDef) and not item.name.startswith("_"):
          yield f"{node.name}.{item.name}", item


def _undocumented(node) -> list[str]:
  """What the gemma library's style asks of `node`'s docstring and it
  lacks: a docstring; with more than one argument, each argument named
  under "Args:" (a lone argument may be described in the prose); a
  "Returns:" (or "Yields:") when it returns a value and the summary does
  not say what (a one-line summary that is the value suffices)."""
  doc = ast.get_docstring(node)
  if not doc:
    return ["a docstring"]
  args = [
    a.arg
    for a in node.args.args + node.args.kwonlyargs
    if a.arg not in ("self", "cls")
  ]
  missing = []
  if len(args) > 1:
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    missing += [
      f"argument {a!r}"
      for a in args
      if not re.search(rf"^\s+\*{{0,2}}{a}\b", section, re.M)
      and f"`{a}`" not in doc
    ]
  returns = any(
    isinstance(n, ast.Return) and n.value is not None for n in ast.walk(node)
  )
  properties = {d.id for d in node.decorator_list if isinstance(d, ast.Name)}
  if (
    returns
    and len(args) > 1
    and not properties & {"property"}
    and not ("Returns:" in doc or "Yields:" in doc or "\n" not in doc.strip())
  ):
    missing.append("Returns:")
  return missing


@pytest.mark.parametrize("module, path", list(_modules()))
def test_public_functions_document_their_arguments_and_returns(module, path):
  problems = {
    name: missing
    for name, node in _public_functions(path)
    if (missing := _undocumented(node))
  }
  assert not problems, f"{module}: {problems}"


def _tracked_text_files():
  files = subprocess.run(
    ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
  ).stdout.split()
  return [
    f
    for f in files
    if f.endswith((".py", ".md", ".toml", ".cfg", ".yaml", ".txt"))
    or f == ".ci/run"
  ]


# Files a run writes (WORKDIR/results.md), not the repository's.
OUTPUTS = ("results.md",)


def test_nothing_cites_a_file_the_repository_lacks():
  """Every markdown file the code and the docs cite is in the repository (but
  what a run writes into its workdir)."""
  tracked = set(_tracked_text_files())
  present = {os.path.basename(f) for f in tracked} | {
    f
    for f in subprocess.run(
      ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
  }
  cited = {}
  for name in tracked:
    with open(os.path.join(REPO, name), encoding="utf-8") as f:
      for match in re.finditer(r"\b([\w./-]*[A-Za-z_]\.md)\b", f.read()):
        cited.setdefault(match.group(1), name)
  missing = {
    doc: where
    for doc, where in cited.items()
    if doc not in present
    and os.path.basename(doc) not in present
    and os.path.basename(doc) not in OUTPUTS
  }
  assert not missing, missing


def test_the_shape_legend_is_one():
  """Each module's shape legend uses docs/design.md's letters in their
  meanings: a letter's first word there is in the legend's meaning."""
  design = open(os.path.join(REPO, "docs", "design.md")).read()
  legend = dict(re.findall(r"^\| ([A-Z]) \| (.+?) \|$", design, re.M))
  assert len(legend) >= 20
  for module, path in _modules():
    doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    if "Shape legend" not in doc:
      continue
    text = " ".join(doc.split("Shape legend", 1)[1].split())
    for letter, word in re.findall(r"(?:^|[,:;] |\()([A-Z]) ([a-z_]+)", text):
      assert letter in legend, f"{module}: {letter} is not in the legend"
      assert word.rstrip("s") in legend[letter].lower(), (
        f"{module}: {letter} {word}..., but the legend's {letter} is "
        f"{legend[letter]!r}"
      )
