"""The Python example of docs/autocompress.md runs as written and its plan meets its budget."""

import os
import re

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "autocompress.md")


def test_doc_example_runs_and_meets_its_budget():
  with open(DOC) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  assert len(blocks) == 1
  namespace: dict = {}
  exec(compile(blocks[0], "docs/autocompress.md", "exec"), namespace)
  plan, sens = namespace["plan"], namespace["sens"]
  assert sens.compiles == 1
  assert plan.size_bytes == sum(l.bytes for l in plan.layers) <= 6_000
  assert namespace["found"].allocation.gap == 0
  assert [l.path for l in plan.layers] == ["Conv_0", "Conv_1", "Dense_1", "Dense_0"]
  assert namespace["comp"].quantizer is not None
