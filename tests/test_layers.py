"""The package's shape: layers import only downwards, no import cycle anywhere, and the public names stay public."""

import ast
import functools
from pathlib import Path

import pytest

import jlora

PACKAGE = Path(jlora.__file__).parent
# Bottom to top; a module may import its own layer and those below it, never one above.
LAYERS = {"errors": 0, "tree": 0, "checks": 0, "core": 1, "exchange": 2, "training": 3, "research": 4, "cli": 5}


def layer(module: str) -> int | None:
    """The layer of a dotted module name inside jlora (None: the package itself, or not jlora)."""
    parts = module.split(".")
    if parts[0] != "jlora" or len(parts) == 1:
        return None
    return LAYERS[parts[1]]


@functools.cache
def imports(file: Path) -> list[tuple[int, str]]:
    """(line, module) of every jlora import in `file`, at any depth (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jlora":  # from jlora import plots: a submodule
                found += [(node.lineno, f"jlora.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, m) for line, m in found if m.split(".")[0] == "jlora"]


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(file): file for file in sorted(PACKAGE.rglob("*.py"))}


# Every module parsed once, at collection: CPython 3.11's ast.parse can fail with "AST constructor recursion
# depth mismatch" when other threads run beside it (python/cpython#106905), and by test time a worker has
# the threads of the tests before (checkpoint writers, progress bars).
for _file in modules().values():
    imports(_file)

# The rooms of the training layer: data (where a batch is made) and records (where anything is written)
# import neither each other nor run; run (where an update happens) composes both.
ROOMS = {"data": {"data"}, "records": {"records"}, "run": {"data", "records", "run"}}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["jlora", "training"] and parts[2] in ROOMS else None


def import_graph(found: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the jlora modules it imports}; ``from jlora.x import y`` is an edge to jlora.x.y if that is a module."""
    graph = {}
    for name, file in found.items():
        edges = set()
        for _, imported in imports(file):
            parent, _, last = imported.rpartition(".")
            edges.add(imported if imported in found or parent not in found else parent)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: each a list of modules ending where it starts (depth-first search)."""
    found, state, path = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_every_module_belongs_to_a_layer():
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert tops - {"__init__"} == set(LAYERS)


def test_no_module_imports_a_layer_above_its_own():
    upward = []
    for file in sorted(PACKAGE.rglob("*.py")):
        name = module_name(file)
        own = layer(name)
        if own is None:  # jlora/__init__.py: the curated surface re-exports every layer
            continue
        for line, imported in imports(file):
            theirs = layer(imported)
            if theirs is not None and theirs > own:
                upward.append(f"{file.relative_to(PACKAGE.parent)}:{line} ({name}) imports {imported}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle_anywhere():
    found = cycles(import_graph(modules()))
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle(tmp_path):
    a, b, c = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    a.write_text("from jlora.b import f\n")
    b.write_text("def g():\n    from jlora import c\n")
    c.write_text("import jlora.a\n")
    graph = import_graph({"jlora.a": a, "jlora.b": b, "jlora.c": c})
    assert graph == {"jlora.a": {"jlora.b"}, "jlora.b": {"jlora.c"}, "jlora.c": {"jlora.a"}}
    assert cycles(graph) == [["jlora.a", "jlora.b", "jlora.c", "jlora.a"]]
    assert cycles({"jlora.a": {"jlora.b"}, "jlora.b": set()}) == []


def test_the_rooms_of_training_import_only_what_they_may():
    crossing = []
    for name, file in modules().items():
        own = room(name)
        for line, imported in imports(file) if own else ():
            theirs = room(imported)
            if theirs is not None and theirs not in ROOMS[own]:
                crossing.append(f"{file.relative_to(PACKAGE.parent)}:{line} ({own}) imports {imported} ({theirs})")
    assert not crossing, "\n".join(crossing)
    assert {room(n) for n in modules()} == {None, *ROOMS}  # every room exists and holds modules


# The rooms of the core, each importing only itself and the rooms it builds on: the LoRA maths knows no
# model, the models no training update, the update no adapter algebra, decoding or analysis.
CORE_ROOMS = {
    "lora": {"lora"},
    "models": {"lora", "models"},
    "update": {"lora", "models", "update"},
    "algebra": {"lora", "models", "update", "algebra"},
    "decoding": {"lora", "models", "update", "algebra", "decoding"},
    "analysis": {"lora", "models", "update", "analysis"},
}


def core_room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["jlora", "core"] and parts[2] in CORE_ROOMS else None


def test_the_rooms_of_the_core_import_only_what_they_may():
    crossing = []
    for name, file in modules().items():
        own = core_room(name)
        for line, imported in imports(file) if own else ():
            theirs = core_room(imported)
            if theirs is not None and theirs not in CORE_ROOMS[own]:
                crossing.append(f"{file.relative_to(PACKAGE.parent)}:{line} ({own}) imports {imported} ({theirs})")
    assert not crossing, "\n".join(crossing)
    in_core = [n for n in modules() if n.startswith("jlora.core.") and n.count(".") >= 2]
    assert all(core_room(n) for n in in_core), [n for n in in_core if not core_room(n)]  # no module outside a room
    assert {core_room(n) for n in in_core} == set(CORE_ROOMS)


def test_the_walk_sees_imports_inside_functions(tmp_path):
    file = tmp_path / "m.py"
    file.write_text("import os\n\ndef f():\n    from jlora.cli.main import main\n    from jlora import plots\n")
    assert imports(file) == [(4, "jlora.cli.main"), (5, "jlora.plots")]


# Every name `jlora` exported before the package was split into layers (a user's code uses these), but
# those `CHANGES` lists: removed, each with its replacement in docs/architecture.md's "Changes".
PUBLIC_BEFORE = """
GPT2 GPT2Config LoraConfig CheckpointError load_gpt2 save_gpt2 init_params init_lora init_cache
flatten_adapters unflatten_adapters lora_delta scaling effective_lr alpha_for_rank adapter_param_count
adapter_compression module_counts lora_param_count compression_ratio delta_w merge unmerge delta_svd
factored_svd spectrum amplification subspace_similarity subspace_similarity_grid lora_from_delta
OptimConfig learning_rate trainable_mask partition combine make_optimizer TrainState init_state train_step
make_train_step make_eval_step initialize_distributed load_adapter
load_checkpoint load_run save_peft load_peft save_merged Generation generate generate_text
""".split()
# removed public name -> what replaces it (the pmap helpers went with pmap: one placement on a device mesh)
CHANGES = {
    "replicate": "Placement.place",
    "unreplicate": "fetch",
    "shard_batch": "Placement.place_batch",
}


@pytest.mark.parametrize("name", PUBLIC_BEFORE)
def test_public_names_still_work_from_jlora(name):
    assert name in jlora.__all__
    assert callable(getattr(jlora, name))


@pytest.mark.parametrize(("name", "replacement"), CHANGES.items())
def test_removed_public_names_are_listed_with_their_replacement(name, replacement):
    assert name not in jlora.__all__ and not hasattr(jlora, name)
    changes = (PACKAGE.parent / "docs" / "architecture.md").read_text().split("\n## Changes\n", 1)[1]
    line = next(line for line in changes.splitlines() if f"`{name}`" in line)
    assert f"`{replacement}`" in line
    owner, _, attribute = replacement.partition(".")
    assert callable(getattr(getattr(jlora, owner), attribute) if attribute else getattr(jlora, owner))


def test_all_lists_only_what_exists():
    missing = [name for name in jlora.__all__ if not hasattr(jlora, name)]
    assert not missing and len(set(jlora.__all__)) == len(jlora.__all__)


def test_one_placement_no_pmap():
    """Every step is jit over a device mesh (`jlora.core.update.mesh`): no pmap path, no flag that says so."""
    found = [
        f"{file.relative_to(PACKAGE.parent)}:{i}"
        for file in PACKAGE.rglob("*.py")
        for i, line in enumerate(file.read_text().splitlines(), 1)
        if "pmapped" in line or "jax.pmap" in line
    ]
    assert not found, found
