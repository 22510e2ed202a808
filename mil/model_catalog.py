"""Names and one-line summaries of the registered students, read from the source without torch.

``wsi-pipeline train --list-models`` must answer at once, and importing the students means
importing torch (seconds on a loaded CPU). This reads the same facts the registry records
(:func:`mil.models.register_model`: the builder's name, its docstring's first line or else the
model class's) from the ``@register_model`` builders in ``mil/models/*.py`` with :mod:`ast`.
``tests/pipeline/test_cli_fast.py`` checks that it agrees with the registry itself.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

__all__ = ["model_summaries"]


def _first_line(doc: str | None) -> str:
    doc = inspect.cleandoc(doc or "").strip()
    return doc.splitlines()[0] if doc else ""


def _is_register_call(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else node
    return (isinstance(func, ast.Name) and func.id == "register_model") or (
        isinstance(func, ast.Attribute) and func.attr == "register_model")


def model_summaries() -> dict[str, str]:
    """``{name: summary}`` of every ``@register_model`` builder in ``mil/models/*.py``, sorted."""
    builders: list[tuple[str, str, str | None]] = []  # name, own summary, model class name
    class_docs: dict[str, str] = {}
    for path in sorted((Path(__file__).resolve().parent / "models").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                class_docs.setdefault(node.name, _first_line(ast.get_docstring(node, clean=False)))
            elif isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    if not _is_register_call(deco):
                        continue
                    cls = None
                    for kw in getattr(deco, "keywords", []):
                        if kw.arg == "model_cls" and isinstance(kw.value, ast.Name):
                            cls = kw.value.id
                    builders.append((node.name, _first_line(ast.get_docstring(node, clean=False)), cls))
    return {name: own or class_docs.get(cls or "", "") for name, own, cls in sorted(builders)}
