"""No gluon_imagenet module imports another in a circle, counting imports inside functions: a circle means one
fact has two owners that each need the other (pack -> packed -> pack was one), and it breaks at import time as
soon as one of them imports the other at the top."""
import ast
import os

from conftest import ROOT

PACKAGE = "gluon_imagenet"


def imported_modules(source: str, modules: set[str]) -> set[str]:
    """The package's modules (names in `modules`) that this source imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from gluon_imagenet import packed` imports the module packed; `from gluon_imagenet.packed import x`
            # the module packed.
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE and len(parts) > 1 and parts[1] in modules:
                found.add(parts[1])
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = set(sources)
    return {name: imported_modules(text, modules) - {name} for name, text in sources.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path of modules that closes it (a -> b -> a)."""
    found, done = [], set()

    def visit(module, path):
        if module in path:
            found.append(path[path.index(module):] + [module])
            return
        if module in done:
            return
        for target in sorted(graph[module]):
            visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    return found


def package_sources() -> dict[str, str]:
    folder = os.path.join(ROOT, PACKAGE)
    sources = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py") and name != "__init__.py":
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                sources[name[:-3]] = f.read()
    return sources


def test_no_module_imports_another_in_a_circle():
    sources = package_sources()
    assert {"packed", "pack", "doctor", "memory_probe", "recipe"} <= set(sources)
    found = circles(import_graph(sources))
    assert found == [], "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_circle_finder_sees_imports_inside_functions():
    sources = {
        "pack": "from gluon_imagenet.packed import read_meta\n",
        "packed": "def check_for():\n    from gluon_imagenet.pack import check_packed_split\n",
        "doctor": "from gluon_imagenet import names\ndef run():\n    from gluon_imagenet import memory_probe\n",
        "memory_probe": "import gluon_imagenet.doctor\n",
        "names": "import os\n",
    }
    graph = import_graph(sources)
    assert graph["doctor"] == {"names", "memory_probe"} and graph["names"] == set()
    assert sorted(map(tuple, circles(graph))) == [("doctor", "memory_probe", "doctor"), ("pack", "packed", "pack")]
