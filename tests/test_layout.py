"""The code's structure: imports go one way (no circles; libraries never import the CLI module), and every flag
declares whether --resume must keep it."""

import ast

import pytest

from config import add_flag, build_parser, declared_flags, resume_keys
from trainer.utils import REPO_ROOT

PACKAGES = ("datasets", "model", "trainer", "dataloader")
ENTRY_POINTS = ("train_retriever", "train_ranker", "recommend", "datasets.__main__")


def project_modules() -> dict[str, set[str]]:
    """module name -> the project modules it imports (anywhere in the file, lazy imports included)."""
    files = {path.stem: path for path in REPO_ROOT.glob("*.py")}
    for package in PACKAGES:
        for path in (REPO_ROOT / package).glob("*.py"):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    graph = {}
    for name, path in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
        graph[name] = {module for module in imported if module in files and module != name}
    return graph


def test_import_graph_has_no_circle():
    graph = project_modules()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dependency in sorted(graph[module]):
            assert state.get(dependency) != "open", " -> ".join([*path, module, dependency])
            if dependency not in state:
                visit(dependency, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_only_entry_points_import_the_cli_module():
    importers = {module for module, imported in project_modules().items() if "config" in imported}
    assert importers <= set(ENTRY_POINTS), importers - set(ENTRY_POINTS)


def test_every_flag_declares_its_resume_stages():
    undeclared = [a.dest for a in build_parser()._actions if a.dest != "help" and not hasattr(a, "resume_stages")]
    assert undeclared == []
    with pytest.raises(TypeError):
        add_flag(build_parser(), "--new_flag", type=int)  # no declaration, no flag


def test_resume_keys_follow_the_declarations():
    retriever, ranker = resume_keys("retriever"), resume_keys("ranker")
    assert {"dataset_name", "seed", "min_uc", "lr", "bert_dropout", "train_all_items"} <= set(retriever)
    assert {"dataset_name", "seed", "lora_lr", "lora_max_steps", "llm_train_candidates"} <= set(ranker)
    # flags that may change between a run and its --resume: limits, evaluation-only and output flags
    free = {"max_steps", "val_iterations", "early_stopping_patience", "llm_fusion", "llm_eval_batch_size", "run_name"}
    assert not free & (set(retriever) | set(ranker))
    assert "lr" not in ranker and "lora_lr" not in retriever
    assert {"bert_max_len", "bert_hidden_units", "attn_heads", "lora_r"} <= set(declared_flags(lambda a: a.positive))
