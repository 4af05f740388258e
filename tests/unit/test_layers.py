"""The pack's import layers, read from the source with ast (nothing is imported):

    __main__ -> cli -> nodes, training -> pipelines -> attention

An import may go down the layers, never up, and nodes/ and training/ never import each other. The root
``__init__`` is ComfyUI's entry point: it imports nodes/ lazily and nothing else of the pack but ``version.py``
(the version string, below every layer); it sits beside cli/.
Imports inside functions count (a lazy import is still a dependency). No cycle between the pack's modules; a
method folder of pipelines/ never imports another's; attention/ never imports ComfyUI; only the tiny-models
command imports the synthetic builders (pipelines/synthetic/), which are for tests. The checker itself is tested
on small made-up packages first.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACK = "humanref"
REPO = Path(__file__).resolve().parents[2]
LAYER_DIRS = ("attention", "pipelines", "nodes", "training", "cli")
RANK = {"version": -1, "attention": 0, "pipelines": 1, "nodes": 2, "training": 2, "cli": 3, "root": 3, "__main__": 4}
SIBLINGS = {("nodes", "training"), ("training", "nodes")}
METHODS = ("parts2whole", "mimicbrush", "hands", "anydressing")
SYNTHETIC = f"{PACK}.pipelines.synthetic"
SYNTHETIC_USERS = {f"{PACK}.cli.tiny_models"}
# ComfyUI's top-level modules and packages (a ComfyUI checkout's root); inside the pack every import is relative,
# so an absolute import of one of these names is ComfyUI's.
COMFY_MODULES = {"comfy", "comfy_api", "comfy_api_nodes", "comfy_config", "comfy_execution", "comfy_extras",
                 "folder_paths", "nodes", "node_helpers", "latent_preview", "execution", "server", "main", "app",
                 "api_server", "middleware", "protocol", "utils", "comfyui_version", "cuda_malloc", "new_updater",
                 "hook_breaker_ac10a0", "alembic_db"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module, dotted from the pack's name
    target: str  # a module of the pack (dotted), or the top-level name of an outside module
    line: int
    lazy: bool  # inside a function body
    pack: bool
    relative: bool = True
    statement: str = ""  # the import as written

    def describe(self, modules: dict[str, Path]) -> str:
        path = modules.get(self.source)
        where = path.relative_to(REPO) if path is not None and path.is_relative_to(REPO) else self.source
        return f"{where}:{self.line}: {self.source} -> {self.target}{' (lazy)' if self.lazy else ''}"


# ----------------------------------------------------------------------------------------------------- the checker
def module_name(path: Path, root: Path, pack: str = PACK) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([pack, *parts])


def pack_modules(root: Path, layer_dirs: tuple[str, ...] = LAYER_DIRS, pack: str = PACK) -> dict[str, Path]:
    """{dotted name: file} for the root's own .py files and every .py under the layer folders."""
    files = sorted(root.glob("*.py"))
    for folder in layer_dirs:
        files += sorted(p for p in (root / folder).rglob("*.py") if "__pycache__" not in p.parts)
    return {module_name(p, root, pack): p for p in files}


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest dotted prefix of ``name`` that is a module of the pack (``pkg.mod.attr`` -> ``pkg.mod``)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts) if parts else name


class _ImportVisitor(ast.NodeVisitor):
    def __init__(self, source: str, is_package: bool, modules: dict[str, Path], pack: str):
        self.source, self.modules, self.pack = source, modules, pack
        self.package = source if is_package else source.rpartition(".")[0]
        self.depth = 0
        self.found: list[Import] = []

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def _add(self, target: str, node: ast.Import | ast.ImportFrom) -> None:
        pack = target == self.pack or target.startswith(self.pack + ".")
        resolved = _resolve(target, self.modules) if pack else target.split(".")[0]
        relative = isinstance(node, ast.ImportFrom) and node.level > 0
        self.found.append(Import(self.source, resolved, node.lineno, self.depth > 0, pack, relative,
                                 ast.unparse(node)))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0:
            base = node.module or ""
        else:
            parts = self.package.split(".")
            parts = parts[:len(parts) - (node.level - 1)]
            base = ".".join(parts + ([node.module] if node.module else []))
        pack = base == self.pack or base.startswith(self.pack + ".")
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            self._add(submodule if pack and submodule in self.modules else base, node)


def imports_of(source: str, path: Path, modules: dict[str, Path], pack: str = PACK) -> list[Import]:
    """Every import statement of one file, module level and inside functions, resolved to pack modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    visitor = _ImportVisitor(source, path.name == "__init__.py", modules, pack)
    visitor.visit(tree)
    return visitor.found


def all_imports(modules: dict[str, Path], pack: str = PACK) -> list[Import]:
    return [imp for name, path in modules.items() for imp in imports_of(name, path, modules, pack)]


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with a cycle (two or more modules, or one importing itself), sorted;
    Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in edges.get(node, ()):
                    cycles.append(sorted(component))
    return sorted(cycles)


def layer(module: str) -> str:
    """The layer of a dotted module name: the folder under the pack, "root" for the pack's __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "root"


def upward_imports(imports: list[Import]) -> list[Import]:
    """Imports that run up a layer or sideways between nodes/ and training/; the root's lazy import of nodes/ is
    the one way down from the root (ComfyUI's entry point) and nothing else of the pack may be imported there."""
    bad = []
    for imp in imports:
        if not imp.pack:
            continue
        src, dst = layer(imp.source), layer(imp.target)
        if src == "root":
            if not ((dst == "nodes" and imp.lazy) or dst == "version"):
                bad.append(imp)
        elif src not in RANK or dst not in RANK or RANK[dst] > RANK[src] or (src, dst) in SIBLINGS:
            bad.append(imp)
    return bad


def method_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "pipelines" and parts[2] in METHODS:
        return parts[2]
    return None


def cross_method_imports(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if imp.pack and method_of(imp.source) and method_of(imp.target)
            and method_of(imp.source) != method_of(imp.target)]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# ------------------------------------------------------------------------------------------- the checker, tested
def write_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return pack_modules(root, ("attention", "pipelines", "nodes", "cli"), "demo")


def test_checker_resolves_relative_and_lazy_imports_and_finds_a_cycle(tmp_path):
    modules = write_package(tmp_path, {
        "__init__.py": "",
        "attention/__init__.py": "",
        "attention/a.py": "from . import b\nimport torch\n",
        "attention/b.py": "def f():\n    from .a import g\n",
        "pipelines/__init__.py": "",
        "pipelines/p.py": "from ..attention.a import x\nfrom ..attention import b as bb\nfrom .. import VERSION\n",
    })
    imports = all_imports(modules, "demo")
    found = {(i.source, i.target, i.lazy, i.pack) for i in imports}
    assert found == {
        ("demo.attention.a", "demo.attention.b", False, True),
        ("demo.attention.a", "torch", False, False),
        ("demo.attention.b", "demo.attention.a", True, True),
        ("demo.pipelines.p", "demo.attention.a", False, True),
        ("demo.pipelines.p", "demo.attention.b", False, True),
        ("demo.pipelines.p", "demo", False, True),
    }
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.pack:
            edges.setdefault(imp.source, set()).add(imp.target)
    assert find_cycles(edges) == [["demo.attention.a", "demo.attention.b"]]  # the lazy edge closes it


def test_find_cycles_on_made_up_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"a"}}) == [["a"]]
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "e"}}) == [["a", "b"], ["c", "d"]]
    chain = {f"m{i}": {f"m{i + 1}"} for i in range(3000)}  # deep: no recursion limit
    assert find_cycles(chain) == []
    chain["m3000"] = {"m0"}
    assert len(find_cycles(chain)[0]) == 3001


def test_upward_and_cross_method_imports_are_caught():
    def imp(source, target, lazy=False):
        return Import(source, target, 1, lazy, True)

    ok = [imp("humanref.cli.run", "humanref.nodes"), imp("humanref.nodes.x", "humanref.pipelines.references.patch"),
          imp("humanref.training.loop", "humanref.attention.masks"), imp("humanref.__main__", "humanref.cli"),
          imp("humanref", "humanref.nodes", lazy=True), imp("humanref.cli", "humanref"),
          imp("humanref.pipelines.hands.weights", "humanref.pipelines.loading.files")]
    assert upward_imports(ok) == []
    bad = [imp("humanref.attention.bank", "humanref.pipelines.references.patch"),
           imp("humanref.pipelines.x", "humanref.cli.run", lazy=True), imp("humanref.nodes.a", "humanref"),
           imp("humanref.nodes.a", "humanref.training.base"), imp("humanref.training.base", "humanref.nodes"),
           imp("humanref", "humanref.nodes"), imp("humanref", "humanref.pipelines.images", lazy=True),
           imp("humanref.stray", "humanref.attention")]
    assert upward_imports(bad) == bad
    assert upward_imports([Import("humanref.attention.a", "comfy", 1, False, False)]) == []
    cross = imp("humanref.pipelines.hands.weights", "humanref.pipelines.mimicbrush.weights")
    same = imp("humanref.pipelines.hands.canvas", "humanref.pipelines.hands.keypoints")
    shared = imp("humanref.pipelines.hands.canvas", "humanref.pipelines.references.inputs")
    assert cross_method_imports([cross, same, shared]) == [cross]


# ------------------------------------------------------------------------------------------------------ the pack
@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return pack_modules(REPO)


@pytest.fixture(scope="module")
def imports(modules) -> list[Import]:
    return all_imports(modules)


def report(found: list[Import], modules: dict[str, Path]) -> str:
    return "\n".join(imp.describe(modules) for imp in found)


def test_the_scan_sees_the_layers(modules, imports):
    assert {layer(m) for m in modules} >= {"root", "__main__", *LAYER_DIRS}
    assert any(i.lazy and i.pack for i in imports)


def test_no_import_cycle(modules, imports):
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.pack:
            edges.setdefault(imp.source, set()).add(imp.target)
    cycles = find_cycles(edges)
    lines = []
    for cycle in cycles:
        members = set(cycle)
        lines += [imp.describe(modules) for imp in imports if imp.source in members and imp.target in members]
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles) + "\n" + "\n".join(lines)


def test_no_import_runs_up_a_layer(modules, imports):
    bad = upward_imports(imports)
    assert not bad, "imports up a layer (or between nodes/ and training/):\n" + report(bad, modules)


def test_a_method_folder_never_imports_another(modules, imports):
    bad = cross_method_imports(imports)
    assert not bad, "a method folder importing another:\n" + report(bad, modules)


def test_attention_never_imports_comfy(modules, imports):
    bad = [i for i in imports if layer(i.source) == "attention" and not i.pack and i.target in COMFY_MODULES]
    assert not bad, "attention/ importing ComfyUI:\n" + report(bad, modules)


def test_pipelines_never_import_nodes_cli_or_training(modules, imports):
    bad = [i for i in imports if i.pack and layer(i.source) == "pipelines" and layer(i.target) in
           ("nodes", "cli", "training")]
    assert not bad, "pipelines/ importing the pack's nodes/, cli/ or training/:\n" + report(bad, modules)


def test_only_the_tiny_models_command_imports_the_synthetic_builders(modules, imports):
    bad = [i for i in imports if i.pack and _within(i.target, SYNTHETIC) and not _within(i.source, SYNTHETIC)
           and i.source not in SYNTHETIC_USERS]
    assert not bad, "production code importing pipelines/synthetic/:\n" + report(bad, modules)


def test_imports_of_the_pack_are_relative_and_comfyuis_nodes_is_named_apart(modules, imports):
    """``import humanref...`` would load a second copy under ComfyUI's custom_nodes name; ComfyUI's own ``nodes``
    module is imported as ``comfy_nodes`` so it cannot be read as the pack's nodes/."""
    absolute = [i for i in imports if i.pack and not i.relative]
    comfy_nodes = [i for i in imports if not i.pack and i.target == "nodes" and layer(i.source) == "pipelines"
                   and i.statement != "import nodes as comfy_nodes"]
    assert not absolute, "absolute imports of the pack:\n" + report(absolute, modules)
    assert not comfy_nodes, "ComfyUI's nodes imported under another name:\n" + report(comfy_nodes, modules)
