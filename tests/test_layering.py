"""The import graph of cnn_jax/ (docs/architecture.md): no cycles between modules, and
each layer imports only the layers below it. Read from the source (every import
statement, also those inside functions), so nothing is imported to check it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (layer, module prefixes), lowest first; a module may import its own layer's modules
# and any lower layer's. models and data share a level and know nothing of each other.
LAYERS = [
    (0, "errors", ("cnn_jax.errors", "cnn_jax.cache", "cnn_jax.files", "cnn_jax.accelerator",
                   "cnn_jax.recipe")),
    (1, "kernels", ("cnn_jax.cpu_kernels", "cnn_jax.onednn", "cnn_jax")),
    (1, "models", ("cnn_jax.models",)),
    (1, "data", ("cnn_jax.data",)),
    (2, "provenance", ("cnn_jax.provenance",)),
    (2, "cost", ("cnn_jax.cost", "cnn_jax.summary")),
    (2, "preview", ("cnn_jax.preview",)),
    (3, "train", ("cnn_jax.train",)),
    (4, "inference", ("cnn_jax.trained", "cnn_jax.evaluate", "cnn_jax.transfer")),
    (4, "experiment", ("cnn_jax.experiment",)),
    (5, "experiments", ("experiments",)),
]


def modules() -> dict:
    found = {}
    for top in ("cnn_jax", "experiments"):
        for f in sorted((ROOT / top).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = f
    return found


def import_graph() -> dict:
    """module -> the project's modules it imports (a name imported from a package is
    its submodule where there is one)."""
    mods, graph = modules(), {}
    for name, path in mods.items():
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out |= {a.name for a in node.names if a.name in mods}
            elif isinstance(node, ast.ImportFrom) and node.module in mods:
                out |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                        else node.module for a in node.names}
        graph[name] = sorted(out - {name})
    return graph


def layer_of(module: str):
    best = max(((len(p), layer) for layer in LAYERS for p in layer[2]
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} belongs to no layer of LAYERS"
    return best[1]


def test_no_import_cycle_between_modules():
    graph, state, cycles = import_graph(), {}, []

    def visit(m, path):
        state[m] = "open"
        for n in graph[m]:
            if state.get(n) == "open":
                cycles.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for m, imported in import_graph().items():
        rank, name, _ = layer_of(m)
        for n in imported:
            r, other, _ = layer_of(n)
            if other != name and r >= rank:
                wrong.append(f"{m} ({name}) imports {n} ({other})")
    assert not wrong, "\n".join(wrong)


def test_provenance_sits_below_training():
    assert not [n for n in import_graph()["cnn_jax.provenance"] if n.startswith("cnn_jax.train")]


def test_experiments_share_only_through_cnn_jax():
    """No experiment imports another: what several use (the nets, He et al.'s recipe,
    tables, plots, claims) lives in cnn_jax.experiment."""
    wrong = [f"{m} imports {n}" for m, imported in import_graph().items()
             if m.startswith("experiments.") for n in imported if n.startswith("experiments")]
    assert not wrong, "\n".join(wrong)
