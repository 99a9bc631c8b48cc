"""The package's shape, held: no file of mimbox/ over 450 lines, and its packages in layers, each
importing only from itself and the layers below it (function-local imports included), so that no
circle can form between them. docs/design.md draws the same layers."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mimbox"
MAX_LINES = 450
# bottom up: a module may import from its own layer and those before it
LAYERS = [
    {"mimbox.codes", "mimbox.paths", "mimbox.wire"},          # what C shares, where things are, wire formats
    {"mimbox.host"},                                           # this host's kernel
    {"mimbox.config"},                                         # what a user sets
    {"mimbox.converter", "mimbox.client"},                     # the converter's processes; the client side
    {"mimbox.ops"},                                            # what an operator runs
]


def unit(module: str) -> str:
    """The layer unit of a module: its package (mimbox.converter.relay -> mimbox.converter), or itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def layer(module: str) -> int:
    u = unit(module)
    return next(i for i, names in enumerate(LAYERS) if u in names)


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        yield name, path


def imports(path: Path):
    """Every mimbox module `path` imports, at any depth (a function's own imports too)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mimbox":
            for alias in node.names:        # (from mimbox import X: X is the module)
                yield f"mimbox.{alias.name}" if node.module == "mimbox" else node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("mimbox"))


def test_no_file_of_the_package_is_over_450_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for _, p in modules() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these (a room per concern): {long}"


def test_every_module_sits_in_a_layer_and_imports_only_from_its_own_or_lower():
    wrong = []
    for name, path in modules():
        if name == "mimbox":
            continue
        mine = layer(name)
        for imported in imports(path):
            if imported != "mimbox" and layer(imported) > mine:
                wrong.append(f"{name} ({LAYERS[mine]}) imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_an_import_upward(tmp_path):
    """(the check above can fail)"""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from mimbox.ops.cli import main\n")
    assert layer(next(iter(imports(f)))) == len(LAYERS) - 1 > layer("mimbox.host.kernel")
