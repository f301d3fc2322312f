"""The package's layout rules, read from the source: imports run one way, the model layer stands alone, exports and
the hub never reach into training, and only `folders.py` spells the names of a run's files."""

import ast
import re
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "hf_minigpt"
MODEL_LAYER = {"hf_minigpt.configuration_minigpt", "hf_minigpt.modeling_minigpt"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The package's modules that `path` imports, at the top or inside functions. A relative import must name one."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
                assert base in MODULES, f"{name} imports {base}, which is not a module of the package"
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {candidate for candidate in candidates if candidate in MODULES}
    return found - {name}


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}
GRAPH = {name: imports_of(path) for name, path in MODULES.items()}


def test_the_imports_have_no_circle():
    done, path = set(), []

    def visit(name):
        if name in path:
            pytest.fail(f"import circle: {' -> '.join(path[path.index(name):] + [name])}")
        if name in done:
            return
        path.append(name)
        for imported in sorted(GRAPH[name]):
            visit(imported)
        path.pop()
        done.add(name)

    for name in sorted(GRAPH):
        visit(name)


def test_the_model_layer_imports_nothing_else_from_the_package():
    for name in MODEL_LAYER:
        assert GRAPH[name] <= MODEL_LAYER, f"{name} imports {GRAPH[name] - MODEL_LAYER}"


@pytest.mark.parametrize("prefix", ["hf_minigpt.export", "hf_minigpt.hub", "hf_minigpt.folders"])
def test_exports_the_hub_and_folders_never_import_training(prefix):
    for name, imported in GRAPH.items():
        if name.startswith(prefix):
            assert not {module for module in imported if module.startswith("hf_minigpt.training")}, name


def test_only_folders_spells_the_run_files():
    run_file = re.compile(r"""["'](all_results\.json|log_history\.jsonl|loss\.png|predictions\.csv|settings\.json|"""
                          r"""confusion_matrix\.png|training_state\.json|best_model|step_)""")
    spelled = [f"{name}: {match[1]}" for name, path in MODULES.items() if name != "hf_minigpt.folders"
               for match in run_file.finditer(path.read_text())]
    assert not spelled


def test_every_module_says_what_it_owns():
    assert not [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]


def test_every_package_is_installed():
    """A regular (non-editable) install holds only the packages pyproject.toml lists."""
    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(path) for path in PACKAGE.rglob("__init__.py")} | {"minigpt_commands"}
    assert found <= listed


def test_the_old_convert_module_still_answers_with_a_warning():
    import hf_minigpt.convert
    import hf_minigpt.export

    with pytest.warns(FutureWarning, match="moved to hf_minigpt.export"):
        assert hf_minigpt.convert.gpt2_tokenizer is hf_minigpt.export.gpt2_tokenizer
    with pytest.raises(AttributeError):
        hf_minigpt.convert.no_such_name
