"""The package layout: layers import only downward, the patches are where a reader finds them, and a
plain source checkout imports as an install does."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

from launch import ROOT

PKG = os.path.join(ROOT, "megatron_dsv3")

#: Bottom to top. A module may import from its own layer and the ones before it. The top-level
#: modules (hf, spec, cpu_backend, pretrain) are the public facades and may import any layer.
LAYERS = ["compat", "registry", "config", "parallel", "model", "checkpoint", "training"]
FACADES = {"hf", "spec", "cpu_backend", "pretrain", "__init__"}


def _layer_of(module: str) -> str:
    """'megatron_dsv3.model.mla' -> 'model'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: str, module: str):
    tree = ast.parse(open(path).read())
    package = module.rsplit(".", 1)[0] if not path.endswith("__init__.py") else module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            for name in names:
                if name.startswith("megatron_dsv3"):
                    yield node.lineno, name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("megatron_dsv3"):
                    yield node.lineno, alias.name


def _modules():
    for dirpath, _, files in os.walk(PKG, followlinks=True):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__") if f == "__init__.py" else rel


def test_no_module_imports_from_a_layer_above_it():
    bad = []
    for path, module in _modules():
        own = _layer_of(module)
        if own in FACADES:
            continue
        for line, target in _imports(path, module):
            other = _layer_of(target)
            if other in FACADES or LAYERS.index(other) > LAYERS.index(own):
                bad.append(f"{module}:{line} imports {target} ({other} is above {own})")
    assert not bad, "\n".join(bad)


def test_patches_live_in_the_top_level_directory_and_are_listed():
    link = os.path.join(PKG, "compat", "patches")
    assert os.path.islink(link) and os.path.realpath(link) == os.path.join(ROOT, "patches")
    from megatron_dsv3.compat import cpu_backend, patches

    readme = open(os.path.join(ROOT, "patches", "README.md")).read()
    every = patches.all_patches() + cpu_backend.PATCHES + cpu_backend.TRAINING_PATCHES
    missing = [p.name for p in every if f"`{p.name}`" not in readme]
    assert not missing, f"patches/README.md does not list {missing}"


def test_source_checkout_imports_without_install(tmp_path):
    """PYTHONPATH=<checkout> python -c 'import megatron_dsv3.cpu_backend, megatron_dsv3.hf' on a copy of
    the checkout, with the editable install's finder taken out of the way."""
    copy = tmp_path / "checkout"
    shutil.copytree(ROOT, copy, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "runs", "__pycache__", "*.egg-info"))
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "import megatron_dsv3.cpu_backend, megatron_dsv3.hf, megatron_dsv3.compat.patches as p\n"
            "print(megatron_dsv3.hf.__file__); print(p.__file__)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(copy)}, cwd=str(tmp_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    files = out.stdout.split()
    assert files[0].startswith(str(copy)) and files[1].startswith(str(copy)), out.stdout
