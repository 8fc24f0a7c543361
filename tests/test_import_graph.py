"""No gluon_imagenet module imports another in a circle, counting imports inside functions: a circle means one
fact has two owners that each need the other (pack -> packed -> pack was one), and it breaks at import time as
soon as one of them imports the other at the top."""
import ast
import os

from conftest import ROOT

PACKAGE = "gluon_imagenet"


def imported_modules(source: str, modules: set[str], package: str = "") -> set[str]:
    """The package's modules (dotted names under gluon_imagenet, as in `modules`) that this source imports,
    anywhere in it; `package` is the source's own subpackage, for relative imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from .x import y: relative to the source's own (sub)package
                parents = [PACKAGE] + (package.split(".") if package else [])
                parents = parents[:len(parents) - (node.level - 1)]
                base = ".".join(parents + ([base] if base else []))
            # `from gluon_imagenet import packed` imports the module packed; `from gluon_imagenet.packed import x`
            # the module packed.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] != PACKAGE:
                continue
            for end in range(len(parts), 1, -1):  # the longest dotted prefix that is one of the modules
                if ".".join(parts[1:end]) in modules:
                    found.add(".".join(parts[1:end]))
                    break
    return found


def import_graph(sources: dict[str, str]) -> dict[str, set[str]]:
    modules = set(sources)
    return {name: imported_modules(text, modules, name.rpartition(".")[0]) - {name}
            for name, text in sources.items()}


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
    """Every module's source by dotted name under the package ("packed", or "data.packed" once files move into
    subpackages, whose __init__ is the subpackage's own name)."""
    top = os.path.join(ROOT, PACKAGE)
    sources = {}
    for folder, _, files in os.walk(top):
        prefix = os.path.relpath(folder, top).replace(os.sep, ".")
        for name in sorted(files):
            if not name.endswith(".py") or (name == "__init__.py" and prefix == "."):
                continue
            module = prefix if name == "__init__.py" else name[:-3] if prefix == "." else f"{prefix}.{name[:-3]}"
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                sources[module] = f.read()
    return sources


def test_no_module_imports_another_in_a_circle():
    sources = package_sources()
    assert {"data.packed", "data.pack", "doctor.cli", "train.memory_probe", "recipe"} <= set(sources)
    found = circles(import_graph(sources))
    assert found == [], "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_circle_finder_sees_imports_inside_functions():
    sources = {
        "pack": "from gluon_imagenet.packed import read_meta\n",
        "packed": "def check_for():\n    from gluon_imagenet.pack import check_packed_split\n",
        "doctor": "from gluon_imagenet import names\ndef run():\n    from gluon_imagenet import memory_probe\n",
        "memory_probe": "import gluon_imagenet.doctor\n",
        "names": "import os\n",
        "data.packed": "from gluon_imagenet.data.pack import x\n",
        "data.pack": "from .packed import read_meta\nfrom gluon_imagenet.data import names_in_data\n",
        "data.names_in_data": "",
    }
    graph = import_graph(sources)
    assert graph["doctor"] == {"names", "memory_probe"} and graph["names"] == set()
    assert graph["data.pack"] == {"data.packed", "data.names_in_data"}  # relative and subpackage imports
    assert sorted(map(tuple, circles(graph))) == [("data.pack", "data.packed", "data.pack"),
                                                  ("doctor", "memory_probe", "doctor"), ("pack", "packed", "pack")]
