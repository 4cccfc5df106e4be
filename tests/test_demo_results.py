"""scripts/demo_results.py: the commands it runs and README's results block."""

import os

import pytest

from scripts import demo_results


def test_every_method_runs_in_its_own_workdir():
  commands = {m: demo_results.command(m, "/r", "quick")
              for m in demo_results.METHODS}
  assert all(f"--workdir=/r/{m}" in c for m, c in commands.items())
  assert all("--config=configs/demo.py:quick" in c for c in commands.values())
  assert "--checkpoint=base" in commands["self_refine"]
  assert "--config.schedule=no_shaping" in commands["no_shaping"]
  assert "--config.eval.scaling_num_examples=100" in commands["score"]


def test_readme_block_is_replaced_and_the_rest_kept(tmp_path):
  root, repo = tmp_path / "root", tmp_path / "repo"
  (root / "plots").mkdir(parents=True)
  (repo / "docs").mkdir(parents=True)
  (root / "results.md").write_text("| method |\n|---|\n| Base |\n")
  (root / "plots" / "score_training.svg").write_text("<svg/>")
  readme = repo / "README.md"
  readme.write_text(f"intro\n{demo_results.README_BEGIN}\nold table\n"
                    f"{demo_results.README_END}\noutro\n")
  demo_results.update_readme(str(repo), str(root), "")
  text = readme.read_text()
  assert text.startswith("intro\n") and text.endswith("\noutro\n")
  assert "old table" not in text and "| Base |" in text
  assert "python -m scripts.demo_results --root=DIR`" in text
  assert (repo / "docs" / "demo_score_training.svg").read_text() == "<svg/>"

  readme.write_text("no markers\n")
  with pytest.raises(SystemExit, match="has no <!-- results:begin -->"):
    demo_results.update_readme(str(repo), str(root), "")
  assert readme.read_text() == "no markers\n"
