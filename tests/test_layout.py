"""The static layout (issue 31): no import cycle, no plug-in name in the core, a config that imports no plug-in.

Read from the source with ``ast`` (nothing is imported), so each check also sees function-local imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedsafe.plugins as plugins

SRC = Path(__file__).resolve().parents[1] / "src" / "fedsafe"

# Cycles that remain, each a set of modules in one strongly connected component of the import graph. The list may
# only shrink: a new cycle fails, and so does an entry that no longer is one (delete it when you break it). The last
# one (models -> alignment -> data -> datagen -> models) went when the loader split by layer: fedsafe.models, the
# align-free loader, sits below data/; fedsafe.run_model, which loads model.align's aligned copy, sits above it.
KNOWN_CYCLES: list[set[str]] = []

# Core modules that may not name a plug-in (a registered name or section) as a string or an attribute
CORE = ["config.py", "pipeline.py", "grid.py", "report.py", "results.py", "plugins.py", "fl", "engines"]
# What remains, (file, name): the list may only shrink, as KNOWN_CYCLES
KNOWN_NAMES: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fedsafe modules ``name`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found: set[str] = set()

    def walk(node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # for annotations only: never runs
            if isinstance(child, ast.Import):
                found.update(r for a in child.names if a.name.startswith("fedsafe") and (r := resolve(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = package
                for _ in range(max(child.level - 1, 0)):
                    base = base.rpartition(".")[0]
                module = (f"{base}.{child.module}" if child.module else base) if child.level else (child.module or "")
                if module.startswith("fedsafe"):
                    for a in child.names:  # `from fedsafe.data import sources` imports the module data.sources
                        r = f"{module}.{a.name}" if f"{module}.{a.name}" in modules else resolve(module)
                        if r:
                            found.add(r)
            walk(child)

    walk(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_through_a_function_local_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    tree = "def f():\n    from fedsafe.config import load_config\n"
    names = {"fedsafe.x": Path("x.py"), "fedsafe.config": Path("config.py")}
    path = SRC.parent / "_layout_probe.py"
    path.write_text(tree)
    try:
        assert _imports("fedsafe.x", path, names) == {"fedsafe.config"}
    finally:
        path.unlink()


def test_no_import_cycle_beyond_the_known_ones():
    """Counting function-local imports too: the import graph of src/fedsafe has no cycle but the listed ones."""
    found = cycles(import_graph())
    new = [sorted(c) for c in found if c not in KNOWN_CYCLES]
    assert not new, f"import cycles: {new}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in found]
    assert not gone, f"these cycles are broken (or changed): update KNOWN_CYCLES: {gone}"


def _plugin_names() -> set[str]:
    names = set()
    for name, entry in plugins.entries().items():
        names.add(name)
        if entry.section:
            names.update(entry.section.split("."))
    return names - set(plugins.HOOKS)  # a hook (server_view) may share a section's name


def _core_files() -> list[Path]:
    out = []
    for item in CORE:
        path = SRC / item
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def test_core_names_no_plugin():
    """No core module holds a registered plug-in name or section as a string or an attribute: the core reaches
    plug-ins only through hooks and declared properties."""
    names = _plugin_names()
    found = set()
    for path in _core_files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for stmt in tree.body:  # the registry's one line per plug-in is where the names belong
            if isinstance(stmt, ast.AnnAssign) and getattr(stmt.target, "id", None) == "BUILTIN":
                tree.body.remove(stmt)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.add((str(path.relative_to(SRC)), node.value))
            elif isinstance(node, ast.Attribute) and node.attr in names:
                found.add((str(path.relative_to(SRC)), node.attr))
    # the probe's name is also an aggregation rule's (aggregators.probe), which the core may name as a rule
    found = {(f, n) for f, n in found if n != "probe"}
    new = sorted(found - KNOWN_NAMES)
    assert not new, f"plug-in names in core modules: {new}"
    gone = sorted(KNOWN_NAMES - found)
    assert not gone, f"no longer found, delete from KNOWN_NAMES: {gone}"


def _plugin_modules() -> set[str]:
    out = set()
    for entry in plugins.entries().values():
        for ref in (entry.plugin, entry.config):
            if isinstance(ref, str):
                out.add(ref.partition(":")[0])
    return out


def _plugin_homes() -> set[str]:
    """Where each registered plug-in lives: its folder when it is one (``<concept>/plugin.py``), else its module."""
    out = set()
    for module in _plugin_modules():
        package, _, leaf = module.rpartition(".")
        out.add(package if leaf == "plugin" else module)
    return out


def test_engines_and_the_core_import_no_plugin_module():
    """No engine module (engines/flower/*, the in-process engine), nor any other core module, imports a module of
    a registered plug-in, at module level or inside functions: the Flower engine reads key files and decrypts
    through the plug-in's key ring (``Plugin.deployment_keys``), a refused decryption is
    ``fedsafe.errors.DecryptRefused``."""
    graph = import_graph()
    homes = _plugin_homes()
    assert "fedsafe.defenses.secure_aggregation" in homes and "fedsafe.defenses.weak_dp" in homes
    core = tuple("fedsafe." + item.removesuffix(".py") for item in CORE)
    core_modules = {m for m in graph if m in core or m.startswith(tuple(c + "." for c in core))}
    assert {"fedsafe.engines.inprocess", "fedsafe.engines.flower.client_app", "fedsafe.grid"} <= core_modules
    bad = sorted(f"{m} imports {dep}" for m in core_modules for dep in graph[m]
                 if any(dep == h or dep.startswith(h + ".") for h in homes))
    assert not bad, bad


def test_config_imports_no_plugin():
    """fedsafe.config (module level or inside functions) imports no module of a registered plug-in: the plug-in
    sections validate through the registry's lazy strings."""
    graph = import_graph()
    bad = sorted(m for m in graph["fedsafe.config"] if m in _plugin_modules())
    assert not bad, f"fedsafe.config imports plug-in modules {bad}"
    assert "fedsafe.plugins" in graph["fedsafe.config"]


def test_no_two_files_in_attacks_or_defenses_are_synonyms():
    """A concept is one folder: no file stem in attacks/ or defenses/ is a prefix-variant of another there
    (secure_agg vs secure_aggregation, dp vs differential_privacy, posthoc vs posthoc_finetune)."""
    for folder in ("attacks", "defenses"):
        stems = [p.stem for p in (SRC / folder).glob("*.py") if p.stem != "__init__"]
        stems += [p.name for p in (SRC / folder).iterdir() if p.is_dir() and p.name != "__pycache__"]
        synonyms = {"dp": "differential_privacy", "agg": "aggregation"}
        norm = {s: s.replace("secure_agg", "secure_aggregation") for s in stems}
        for a in stems:
            for b in stems:
                if a == b:
                    continue
                same = norm[a] == norm[b] or synonyms.get(a) == b or b.startswith(a + "_")
                assert not same, f"{folder}/: {a} and {b} name the same concept"


def test_atomic_writes_are_a_leaf():
    """fedsafe.io (atomic writes) imports no other fedsafe module, so everything that writes a file may import it
    (the run directory, the model card, the trackers and the results once formed a cycle through rundir)."""
    graph = import_graph()
    assert graph["fedsafe.io"] == set()
    writers = [m for m in ("fedsafe.hub", "fedsafe.tracking", "fedsafe.results") if "fedsafe.rundir" in graph[m]]
    assert not writers, f"{writers} import fedsafe.rundir for a write: use fedsafe.io"


def test_data_readers_sit_below_the_row_loader():
    """data/: raw records (records) and the held-out split (split) import no other data module, so the row loader
    (sources), the data-generation pipeline (datagen) and the held-out check (holdout) stack without a cycle."""
    graph = import_graph()
    assert graph["fedsafe.data.split"] == set()
    assert graph["fedsafe.data.records"] <= {"fedsafe.config", "fedsafe.errors", "fedsafe.schema"}
    assert "fedsafe.data.holdout" not in graph["fedsafe.data.sources"]
    assert "fedsafe.data.sources" not in graph["fedsafe.data.datagen"]
    assert not (SRC / "attacks" / "datagen.py").exists()  # data generation serves data sources, not one attack


def test_the_base_model_loader_sits_below_data_and_alignment():
    """fedsafe.models (base models, no model.align) imports neither data/ nor the aligned start, so data generation
    loads its generator through it; the align-aware loader (fedsafe.run_model) is what imports alignment."""
    graph = import_graph()
    above = {"fedsafe.alignment", "fedsafe.run_model", "fedsafe.data"}
    assert not {m for m in graph["fedsafe.models"] if m in above or m.startswith("fedsafe.data.")}
    assert "fedsafe.models" in graph["fedsafe.data.datagen"]
    assert "fedsafe.run_model" not in graph["fedsafe.data.datagen"]
    assert "fedsafe.alignment" in graph["fedsafe.run_model"]
    assert [m for m, deps in graph.items() if "fedsafe.alignment" in deps] == ["fedsafe.run_model"]
