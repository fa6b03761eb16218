"""The layering rule: the core is pure, the engine sees only the core, and nothing imports upward."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "streaming"
# Each layer may import itself and the layers after it in this list, never the ones before it.
LAYERS = ("streaming", "streaming.engine", "streaming.core")


def _layer(module: str) -> str:
    return max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)


def _imports(path: Path) -> list[str]:
    """Absolute names of the streaming modules that ``path`` imports."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            found += [f"{base}.{node.module}"] if node.module else [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return [name for name in found if name == "streaming" or name.startswith("streaming.")]


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for name in _imports(path):
            if LAYERS.index(_layer(name)) < LAYERS.index(own):
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_the_core_imports_neither_torch_nor_a_network_library() -> None:
    modules = sorted(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)
                     for p in (PACKAGE / "core").glob("*.py"))
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'websockets', 'aiohttp', 'av'):\n"
        "            raise ImportError(f'the core imported {name}')\n"
        "sys.meta_path.insert(0, Block())\n"
        + "".join(f"import {m.removesuffix('.__init__')}\n" for m in modules)
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                            cwd=PACKAGE.parent, timeout=120)
    assert result.returncode == 0, result.stderr
