"""No import from a lower layer to a higher one, read from the source (ast), imports inside
functions and relative imports included: `models`, `diffusion`, `data` and `parallel` are the
floor and import none of the packages built on them."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rig_jax"
LOWER = ("models", "diffusion", "data", "parallel")
HIGHER = ("weights", "vlm", "rig", "eval", "rl", "train", "bench", "tools")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, package: str) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in `source`, wherever it stands; `package` is
    the package relative imports start from."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from rig_jax import eval` names a package too
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def upward_imports(path: pathlib.Path) -> list[str]:
    forbidden = tuple(f"rig_jax.{p}" for p in HIGHER) + ("tools",)
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
            for line, target in imported_modules(path.read_text(), package)
            if any(target == f or target.startswith(f + ".") for f in forbidden)]


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_import_nothing_above(layer):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"rig_jax/{layer} has no modules"
    problems = [p for f in files for p in upward_imports(f)]
    assert not problems, "\n".join(problems)


def test_the_check_sees_relative_and_function_level_imports():
    source = "def f():\n    from ..eval import judge\n    import rig_jax.weights.io\nfrom . import layers\n"
    found = [target for _, target in imported_modules(source, "rig_jax.models")]
    assert "rig_jax.eval" in found and "rig_jax.eval.judge" in found
    assert "rig_jax.weights.io" in found and "rig_jax.models.layers" in found
