"""
The package's layering, checked on every run: data flows one way, and no
module imports one of a higher layer (docs/design.rst, "Layers").

Imports are read from the source with L{ast}, including the ones inside
functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import mtasts_twisted

PACKAGE_DIR = os.path.dirname(os.path.abspath(mtasts_twisted.__file__))

#: Each part of the package (a top-level module or subpackage) and its layer,
#: bottom (0) to top.  A part may import its own modules and parts of lower
#: layers only; parts of one layer are independent of each other.
LAYERS: dict[str, int] = {
    "__init__": 0,
    "policy": 0,
    "results": 0,
    "interfaces": 0,
    "periodic": 0,
    "dns": 1,
    "pkix": 2,
    "tls": 3,
    "dane": 3,
    "fetch": 3,
    "store": 3,
    "cache": 4,
    "tlsrpt": 5,
    "overrides": 5,
    "delivery": 6,
    "relay": 7,
    "socketmap": 7,
    "twistedmail": 7,
    "metrics": 8,
    "web": 8,
    "service": 9,
    "cli": 10,
    "__main__": 11,
}

#: Shipped test helpers: they may use the whole package, and nothing of the
#: package may use them.
TESTING = "testing"


def _part_of(module: str) -> str:
    """C{mtasts_twisted.dns.wire} → C{dns}; C{mtasts_twisted} → C{__init__}."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))
    name = relative[: -len(".py")].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _imports(path: str, module: str) -> set[str]:
    """Every C{mtasts_twisted} module that the file at C{path} imports."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
    return {name for name in found if name == "mtasts_twisted" or name.startswith("mtasts_twisted.")}


def package_modules() -> dict[str, str]:
    """Module name → file path, for every module of the package."""
    modules = {}
    for directory, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                modules[_module_name(path)] = path
    return modules


def upward_imports() -> list[str]:
    """Every import that breaks the layering, as readable lines."""
    problems = []
    for module, path in sorted(package_modules().items()):
        part = _part_of(module)
        if part == TESTING:
            continue
        if part not in LAYERS:
            problems.append(f"{module}: part {part!r} has no layer in tests/test_layers.py")
            continue
        for target in sorted(_imports(path, module)):
            other = _part_of(target)
            if other == part or target == "mtasts_twisted":
                continue
            if other == TESTING:
                problems.append(f"{module} imports the test helpers {target}")
            elif other not in LAYERS:
                problems.append(f"{module} imports {target}, which has no layer")
            elif LAYERS[other] >= LAYERS[part]:
                problems.append(
                    f"{module} (layer {LAYERS[part]}) imports {target} (layer {LAYERS[other]})")
    return problems


class LayerTests(SynchronousTestCase):
    def test_no_upward_import(self) -> None:
        """No module imports a module of its own or a higher layer."""
        self.assertEqual(upward_imports(), [])

    def test_checker_sees_violations(self) -> None:
        """The checker reads relative and lazy imports (so it can fail)."""
        path = self.mktemp() + ".py"
        with open(path, "w", encoding="utf-8") as f:
            f.write("def f():\n    from ..delivery import Deliverer\n"
                    "from . import wire\nimport mtasts_twisted.cli\n")
        self.assertEqual(
            _imports(path, "mtasts_twisted.dns.resolver"),
            {"mtasts_twisted.delivery", "mtasts_twisted.dns", "mtasts_twisted.cli"},
        )

    def test_every_part_has_a_layer(self) -> None:
        """A new part of the package must be given its place."""
        parts = {_part_of(m) for m in package_modules()} - {TESTING}
        self.assertEqual(parts - set(LAYERS), set())


class DocumentedTests(SynchronousTestCase):
    def test_every_part_documented(self) -> None:
        """README's Design table and docs/design.rst's module map name every part."""
        root = os.path.dirname(PACKAGE_DIR)
        with open(os.path.join(root, "README.rst"), encoding="utf-8") as f:
            readme = f.read().split("\nDesign\n======\n", 1)[1].split("\nLimits\n======\n", 1)[0]
        with open(os.path.join(root, "docs", "design.rst"), encoding="utf-8") as f:
            design = f.read()
        parts = {_part_of(m) for m in package_modules()} - {"__init__", "__main__"}
        self.assertEqual({p for p in parts if f"``{p}``" not in readme}, set())
        self.assertEqual({p for p in parts if f"``{p}``" not in design and f"``{p}/``" not in design}, set())
