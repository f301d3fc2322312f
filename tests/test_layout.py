"""The package's layout rules, read from the source: its layers, each importing only from itself and the layers below;
the model files, which travel in every saved folder, standing alone and timing nothing; and only `folders.py`
spelling the names of a run's files."""

import ast
import re
import tomllib
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).parents[1] / "hf_minigpt"
# The files `save_pretrained` copies beside the weights: the model and the sibling modules it imports.
MODEL_FILES = {f"hf_minigpt.{name}_minigpt"
               for name in ("configuration", "modeling", "compat", "conversion", "loss", "checks")}
# Lowest first. A module belongs to the first layer one of whose names is its name or a package above it.
LAYERS = [
    ("model", {"hf_minigpt", *MODEL_FILES}),
    ("folders, export and speed-ups", {"hf_minigpt.folders", "hf_minigpt.cli", "hf_minigpt.hub", "hf_minigpt.export",
                                       "hf_minigpt.quantize", "hf_minigpt.cpu_kernels", "hf_minigpt.cpu_memory",
                                       "hf_minigpt.chat"}),
    ("training", {"hf_minigpt.training", "hf_minigpt.tasks"}),
    ("commands and benchmark", {"hf_minigpt.pretrain", "hf_minigpt.finetune", "hf_minigpt.generate_cli",
                                "hf_minigpt.convert_cli", "hf_minigpt.convert", "hf_minigpt.vllm_greedy",
                                "hf_minigpt.vllm_lm_eval",
                                "hf_minigpt.eval_cli", "hf_minigpt.evaluation",
                                "hf_minigpt.benchmark"}),
]


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


def layer_of(name: str) -> int:
    for index, (_, members) in enumerate(LAYERS):
        if name in members or any(name.startswith(f"{member}.") for member in members - {"hf_minigpt"}):
            return index
    raise AssertionError(f"{name} belongs to no layer: add it to LAYERS")


def test_every_module_belongs_to_a_layer():
    for name in MODULES:
        layer_of(name)


def test_imports_never_run_up_the_layers():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})"
              for name in sorted(GRAPH) for imported in sorted(GRAPH[name]) if layer_of(imported) > layer_of(name)]
    assert not upward


def test_the_model_files_import_only_each_other():
    for name in MODEL_FILES:
        assert GRAPH[name] <= MODEL_FILES, f"{name} imports {GRAPH[name] - MODEL_FILES}"


def test_the_model_files_time_nothing():
    """What a model computes never depends on how fast something ran."""
    timing = re.compile(r"\btime\.[a-z_]+\(|perf_counter|functools\.cache|\blru_cache\b|import time\b")
    assert not [f"{name}: {match[0]}" for name in MODEL_FILES for match in timing.finditer(MODULES[name].read_text())]


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


def test_the_renamed_q_k_v_helpers_still_answer_with_a_warning():
    import hf_minigpt.convert
    import hf_minigpt.export
    from hf_minigpt.conversion_minigpt import join_fused

    state_dict = {f"h.0.attn.{name}.weight": torch.full((2, 2), float(i)) for i, name in enumerate("qkv")}
    state_dict = {name.replace(".q.", ".q_proj.").replace(".k.", ".k_proj.").replace(".v.", ".v_proj."): tensor
                  for name, tensor in state_dict.items()}
    for module in (hf_minigpt.export, hf_minigpt.convert):
        with pytest.warns(FutureWarning, match="is hf_minigpt.conversion_minigpt.join_fused"):
            fused = module.fused_qkv(state_dict)
        expected = join_fused(state_dict, conv1d=False)["h.0.attn.c_attn.weight"]
        assert torch.equal(fused["h.0.attn.c_attn.weight"], expected)
        with pytest.warns(FutureWarning, match="split_fused"):
            assert module.split_qkv(fused).keys() == state_dict.keys()
