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

__all__ = ["model_summaries", "model_options"]


def _first_line(doc: str | None) -> str:
    doc = inspect.cleandoc(doc or "").strip()
    return doc.splitlines()[0] if doc else ""


def _is_register_call(node: ast.expr) -> bool:
    func = node.func if isinstance(node, ast.Call) else node
    return (isinstance(func, ast.Name) and func.id == "register_model") or (
        isinstance(func, ast.Attribute) and func.attr == "register_model")


def _parse_models() -> tuple[list[tuple[str, str, str | None]], dict[str, ast.ClassDef]]:
    """The ``@register_model`` builders (name, own summary, model class) and every class node."""
    builders: list[tuple[str, str, str | None]] = []
    classes: dict[str, ast.ClassDef] = {}
    for path in sorted((Path(__file__).resolve().parent / "models").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, node)
            elif isinstance(node, ast.FunctionDef):
                for deco in node.decorator_list:
                    if not _is_register_call(deco):
                        continue
                    cls = None
                    for kw in getattr(deco, "keywords", []):
                        if kw.arg == "model_cls" and isinstance(kw.value, ast.Name):
                            cls = kw.value.id
                    builders.append((node.name, _first_line(ast.get_docstring(node, clean=False)), cls))
    return sorted(builders), classes


def model_summaries() -> dict[str, str]:
    """``{name: summary}`` of every ``@register_model`` builder in ``mil/models/*.py``, sorted."""
    builders, classes = _parse_models()
    docs = {name: _first_line(ast.get_docstring(node, clean=False)) for name, node in classes.items()}
    return {name: own or docs.get(cls or "", "") for name, own, cls in builders}


def _class_options(name: str, classes: dict[str, ast.ClassDef]) -> list[str]:
    """``ModelInfo.options`` read from the source: ``__init__`` keywords up the bases while an
    ``__init__`` takes ``**kwargs``, minus ``fixed_options`` and the positional essentials."""
    names: list[str] = []
    fixed: set[str] = {"self", "in_dim", "n_classes"}
    node = classes.get(name)
    while node is not None:
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "fixed_options"
                                                    for t in stmt.targets):
                fixed |= set(ast.literal_eval(stmt.value))
        init = next((s for s in node.body if isinstance(s, ast.FunctionDef) and s.name == "__init__"), None)
        if init is not None:
            names += [a.arg for a in init.args.args + init.args.kwonlyargs if a.arg not in names]
            if init.args.kwarg is None:
                break
        bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
        node = classes.get(bases[0]) if bases and bases[0] != "MILModel" else None
    return [n for n in names if n not in fixed]


def model_options() -> dict[str, tuple[str, ...]]:
    """``{name: keyword arguments the model takes}`` (``mil.models.model_info(name).options``)."""
    builders, classes = _parse_models()
    return {name: tuple(_class_options(cls, classes)) for name, _, cls in builders if cls}
