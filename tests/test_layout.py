"""The code's structure: imports point down the layers (utils < datasets, model < dataloader < trainer < the scripts),
only the scripts import the flag module, and every flag declares its role, from which --resume's keys and the
report's experiment keys both come."""

import ast
import dataclasses
import inspect

import pytest

from config import RANKER, RETRIEVER, add_flag, build_parser, experiment_keys, resume_keys
from model.retrievers import RETRIEVER_MODELS, RETRIEVERS, RetrieverSpec
from utils.files import REPO_ROOT

# A module may import modules of its own package and of lower layers only.
LAYERS = {"utils": 0, "datasets": 1, "model": 1, "dataloader": 2, "trainer": 3}
SCRIPTS = ("config", "train_retriever", "train_ranker", "recommend", "report", "sweep", "datasets.__main__")


def project_modules() -> dict[str, set[str]]:
    """module name -> the project modules it imports (anywhere in the file, lazy imports included; not those under
    `if TYPE_CHECKING:`, which are type hints only and never run)."""
    files = {path.stem: path for path in REPO_ROOT.glob("*.py")}
    for package in (*LAYERS, "bench"):
        for path in (REPO_ROOT / package).glob("*.py"):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    graph = {}
    for name, path in files.items():
        imported = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
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


def test_imports_point_down_the_layers():
    upward = []
    for module, imported in project_modules().items():
        package = module.split(".")[0]
        if module in SCRIPTS or package not in LAYERS:
            continue  # the scripts and benches sit on top
        for dependency in imported:
            target = dependency.split(".")[0]
            if target != package and (target not in LAYERS or LAYERS[target] >= LAYERS[package]):
                upward.append(f"{module} -> {dependency}")
    assert upward == []


def test_each_retriever_imports_only_the_interface_and_shared_layers():
    graph = project_modules()
    retrievers = {model.__module__ for model in RETRIEVERS.values()}
    assert retrievers == {"model.lru", "model.sasrec", "model.bert4rec", "model.narm"}
    for module in retrievers:  # never another retriever, nor the registry (a circle) or the LLM
        assert {m for m in graph[module] if m.startswith("model.")} <= {"model.interface", "model.layers"}, module
    assert not {m for m in graph["model.interface"] | graph["model.layers"] if m.startswith("model.")} - {"model.loss"}


def test_the_registry_holds_every_retriever():
    """Every NextItemModel subclass defined in model/ is registered (else no flag reaches it), and builds itself."""
    defined = set()
    for path in (REPO_ROOT / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", "") == "NextItemModel" for b in node.bases):
                defined.add((f"model.{path.stem}", node.name))
    assert defined == {(model.__module__, model.__name__) for model in RETRIEVERS.values()}
    assert RETRIEVER_MODELS == tuple(RETRIEVERS) == ("lru", "sasrec", "bert4rec", "narm")
    # the inherited from_spec fills a constructor from the spec by name: every other parameter needs a default
    sizes = {field.name for field in dataclasses.fields(RetrieverSpec)}
    for model in RETRIEVERS.values():
        for name, parameter in list(inspect.signature(model).parameters.items())[1:]:
            assert name in sizes or parameter.default is not inspect.Parameter.empty, (model.__name__, name)
    flag = next(a for a in build_parser(RETRIEVER)._actions if a.dest == "retriever_model")
    assert tuple(flag.choices) == RETRIEVER_MODELS


def test_only_scripts_import_the_flag_module():
    importers = {module for module, imported in project_modules().items() if "config" in imported}
    assert {m for m in importers if not m.startswith("bench.")} <= set(SCRIPTS)


def test_every_flag_declares_its_role():
    with pytest.raises(TypeError):
        add_flag(build_parser(RETRIEVER), "--new_flag", type=int)  # no role, no flag
    with pytest.raises(ValueError, match="unknown role"):
        add_flag(build_parser(RETRIEVER), "--new_flag", type=int, role="maybe")


def test_resume_and_report_keys_follow_the_roles():
    retriever, ranker = set(resume_keys(RETRIEVER)), set(resume_keys(RANKER))
    assert {"dataset_name", "seed", "min_uc", "lr", "bert_dropout", "train_all_items", "best_metric"} <= retriever
    assert {"dataset_name", "processes", "seed", "lora_lr", "lora_max_steps", "llm_retrieved_path"} <= ranker
    # flags that may change between a run and its --resume: limits, evaluation-only and output flags
    free = {"max_steps", "val_iterations", "early_stopping_patience", "llm_fusion", "llm_eval_batch_size", "run_name"}
    assert not free & (retriever | ranker)
    assert "lr" not in ranker and "lora_lr" not in retriever
    # the report pools seeds (and each seed's own retriever) but keeps apart runs with other limits or flags
    report_retriever, report_ranker = set(experiment_keys(RETRIEVER)), set(experiment_keys(RANKER))
    assert {"lr", "max_steps", "val_iterations", "early_stopping_patience", "metric_ks"} <= report_retriever
    assert {"lora_lr", "llm_fusion", "processes", "lora_early_stopping_patience"} <= report_ranker
    settings = {"seed", "llm_retrieved_path", "run_name", "num_threads", "val_batch_size", "test_batch_size"}
    settings |= {"gradient_checkpointing", "llm_eval_batch_size", "device", "dataset_name"}
    assert not settings & (report_retriever | report_ranker)
