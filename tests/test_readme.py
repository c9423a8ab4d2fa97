"""The Python examples of README.md run as written (in a temporary working directory)."""

from __future__ import annotations

import os
import re

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_python_blocks_run(tmp_path, monkeypatch):
  with open(README) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) >= 2
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  exec(compile("\n".join(blocks), "README.md", "exec"), namespace)  # blocks build on each other
  assert (tmp_path / "runs/my_net/export/spec.json.gz").is_file()
  assert (tmp_path / "runs/my_net/serving/model.jaxexport").is_file()
  assert abs(float(namespace["metrics"]["sparsity"]) - 0.8) < 1e-3  # per-layer rounding
  assert namespace["report"]["total_bytes"] < namespace["report"]["float32_bytes"]
  assert (namespace["comp"].layers.first, namespace["comp"].layers.last) == ("conv", "out")
