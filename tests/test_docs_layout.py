"""docs/layout.md, the file-by-file map of the code, names every module of the library and every
file of the jobs."""

import os
import re

from conftest import REPO


def _layout() -> str:
  with open(os.path.join(REPO, "docs", "layout.md")) as f:
    return f.read()


def _files(folder: str) -> list[str]:
  return sorted(f for f in os.listdir(os.path.join(REPO, folder))
                if f.endswith(".py") and f != "__init__.py")


def test_layout_names_every_library_module_and_package():
  text = _layout()
  modules = _files("jaxcompress")
  packages = sorted(d for d in os.listdir(os.path.join(REPO, "jaxcompress"))
                    if os.path.isfile(os.path.join(REPO, "jaxcompress", d, "__init__.py")))
  assert len(modules) > 10 and {"budget", "export", "models", "pruning"} <= set(packages)
  assert [m for m in modules if f"`{m}`" not in text] == []
  assert [p for p in packages if not re.search(rf"`{p}/[\w.]*`", text)] == []


def test_layout_names_every_job_file():
  text = _layout()
  files = _files("experiments")
  assert len(files) > 20
  named = set(re.findall(r"experiments[./](\w+)", text)) | set(re.findall(r"(\w+)\.py`", text))
  assert [f for f in files if f.removesuffix(".py") not in named] == []
