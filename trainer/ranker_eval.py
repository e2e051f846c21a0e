"""Stage-2 evaluation: the verbalizer's scores of the candidates, and the test report of the ranker (and the fused
score) against the retriever's own order on the same users, with paired bootstrap confidence intervals, overall
metrics over all test users, and the printed table."""

import json
import math
import time
from pathlib import Path

import torch

from dataloader.prompts import PromptBuilder, candidate_letters
from dataloader.ranker_data import EvalExample, eval_batches, left_pad, true_letter
from datasets.split import SplitData
from trainer.metrics import fuse_scores, label_ranks, metrics_from_ranks, paired_bootstrap, per_user_metric
from trainer.runtime import gather_rows, is_main_process, process_rank, shard
from trainer.verbalizer import verbalizer_scores
from utils.files import atomic_write_json, atomic_write_text
from utils.progress import progress

CPU_EVAL_BATCH = 1  # on CPU, larger (padded) batches were not faster (docs/performance.md)


def eval_batch_size(requested: int | None, micro_batch_size: int, device: torch.device) -> int:
    """--llm_eval_batch_size, else the training micro-batch on CUDA and CPU_EVAL_BATCH on a CPU."""
    return requested or (micro_batch_size if device.type == "cuda" else CPU_EVAL_BATCH)


@torch.no_grad()
def rank_examples(
    model,
    examples: list[EvalExample],
    letter_ids: torch.Tensor,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    desc: str = "ranking users",
) -> torch.Tensor:
    """Verbalizer scores [N, num_candidates] (fp32, in `examples` order); one forward pass per batch,
    the LM head only at the last position (logits_to_keep=1). A progress bar (rank 0) shows the ETA.

    With several processes, each ranks its shard of the examples (every example exactly once) and all of them get
    every score, so every process computes the same metrics and takes the same early-stopping decision.
    """
    was_training = model.training
    model.eval()
    mine = shard(len(examples), *process_rank())
    own = [examples[k] for k in mine]
    scores = torch.empty(len(own), len(letter_ids))
    letter_ids = letter_ids.to(device)
    with progress(len(own), desc, unit="user", disable=not is_main_process()) as bar:
        for indices in eval_batches(own, batch_size):
            batch = left_pad([own[k].input_ids for k in indices], pad_id)
            batch = {key: value.to(device) for key, value in batch.items()}
            logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
            scores[indices] = verbalizer_scores(logits, letter_ids).cpu()
            bar.update(len(indices))
    model.train(was_training)
    return gather_rows(scores, mine, len(examples))


def subset_metrics(scores: torch.Tensor, examples: list[EvalExample], ks: list[int]) -> dict[str, float]:
    labels = torch.tensor([e.label for e in examples], dtype=torch.long)
    return metrics_from_ranks(label_ranks(scores, labels), ks)


# Fusion weights tried on validation: 0 is the LLM alone, inf the retriever's order alone.
FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, math.inf)
FUSION_METRIC = "NDCG@10"
COMPARED_METRICS = ("NDCG@10", "Recall@10")
REPORT_KS = (1, 5, 10)  # the paper's test cut-offs
BOOTSTRAP_RESAMPLES = 2000


def weight_name(weight: float) -> str | float:
    """JSON-safe fusion weight ("inf" for the retriever alone)."""
    return "inf" if math.isinf(weight) else weight


def _labels(examples: list[EvalExample]) -> torch.Tensor:
    return torch.tensor([e.label for e in examples], dtype=torch.long)


def _retriever_scores(examples: list[EvalExample], num_candidates: int) -> torch.Tensor:
    return torch.tensor([e.retriever_scores for e in examples], dtype=torch.float64).view(-1, num_candidates)


def choose_fusion_weight(llm_scores: torch.Tensor, examples: list[EvalExample]) -> dict:
    """The weight of FUSION_WEIGHTS with the best validation NDCG@10 of the fused score (the smallest on ties)."""
    labels, retriever = _labels(examples), _retriever_scores(examples, llm_scores.shape[1])
    by_weight = {
        w: metrics_from_ranks(label_ranks(fuse_scores(llm_scores, retriever, w), labels), [10])[FUSION_METRIC]
        for w in FUSION_WEIGHTS
    }
    best = max(FUSION_WEIGHTS, key=lambda w: (by_weight[w], -w))
    return {
        "weight": weight_name(best),
        "selected_on": f"validation {FUSION_METRIC}, {len(examples)} users",
        f"val_{FUSION_METRIC}_by_weight": {str(weight_name(w)): v for w, v in by_weight.items()},
    }


def _bootstraps(ranks: torch.Tensor, baseline: torch.Tensor, seed: int) -> dict:
    return {
        name: paired_bootstrap(per_user_metric(ranks, name), per_user_metric(baseline, name), BOOTSTRAP_RESAMPLES, seed)
        for name in COMPARED_METRICS
    }


def subset_ranks(
    llm_scores: torch.Tensor, examples: list[EvalExample], fusion_weight: float | str | None, seed: int
) -> dict[str, torch.Tensor]:
    """0-based rank of the true item among the candidates, per user, for each way of ordering them."""
    labels = _labels(examples)
    num_candidates = llm_scores.shape[1]
    ranks = {
        "retriever": torch.tensor([e.retriever_rank for e in examples], dtype=torch.long),
        "llm": label_ranks(llm_scores, labels),
        # one seeded random order: what a ranker that knows nothing scores
        "random": torch.randint(num_candidates, (len(examples),), generator=torch.Generator().manual_seed(seed)),
    }
    if fusion_weight is not None:
        weight = math.inf if fusion_weight == "inf" else float(fusion_weight)
        ranks["fused"] = label_ranks(
            fuse_scores(llm_scores, _retriever_scores(examples, num_candidates), weight), labels
        )
    return ranks


def compare_with_retriever(
    llm_scores: torch.Tensor,
    examples: list[EvalExample],
    fusion_weight: float | str | None,
    seed: int,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict:
    """Metrics of each ordering on these users and, for each, the paired difference from the retriever's order
    in NDCG@10 and Recall@10 with a 95% bootstrap interval over users."""
    return compare_ranks(subset_ranks(llm_scores, examples, fusion_weight, seed), seed, ks)


def compare_ranks(ranks: dict[str, torch.Tensor], seed: int, ks: tuple[int, ...]) -> dict:
    """compare_with_retriever for ranks already computed by subset_ranks."""
    result = {
        "users": len(ranks["retriever"]),
        "metrics": {name: metrics_from_ranks(r, ks) for name, r in ranks.items()},
    }
    result["vs_retriever"] = {
        name: _bootstraps(r, ranks["retriever"], seed) for name, r in ranks.items() if name != "retriever"
    }
    return result


def build_test_report(
    scores: torch.Tensor,
    examples: list[EvalExample],
    test_part: dict,
    split: SplitData,
    ks: tuple[int, ...],
    fusion_weight: float | str | None = None,
    seed: int = 0,
) -> tuple[dict, list[str]]:
    """LLM (and fused) vs retriever on the subset with CIs, overall metrics over all test users, coverage,
    per-user rankings."""
    ranks = subset_ranks(scores, examples, fusion_weight, seed)
    comparison = compare_ranks(ranks, seed, ks)
    # Overall: every test user's rank of the true item; outside the subset it is the retriever's rank
    # in its full ranking (>= the candidate count), inside it the ranker's rank among the candidates.
    # This is the paper's "subset metric x share + retriever metric of the others x their share".
    all_retriever_ranks = torch.as_tensor(test_part["label_ranks"], dtype=torch.long)
    row_of_user = {u: row for row, u in enumerate(test_part["users"].tolist())}
    rows = torch.tensor([row_of_user[e.user] for e in examples], dtype=torch.long)
    overall = {"retriever": metrics_from_ranks(all_retriever_ranks, ks)}
    for name in ("llm", "fused"):
        if name in ranks:
            all_ranks = all_retriever_ranks.clone()
            all_ranks[rows] = ranks[name]
            overall[name] = metrics_from_ranks(all_ranks, ks)
    report = {
        "users_all": len(all_retriever_ranks),
        "users_subset": len(examples),
        "coverage": len(examples) / len(all_retriever_ranks),
        "subset": comparison["metrics"],
        "overall": overall,
        "test_vs_retriever": comparison["vs_retriever"],
    }
    return report, ranking_records(scores, examples, ranks, split)


def ranking_records(
    scores: torch.Tensor, examples: list[EvalExample], ranks: dict[str, torch.Tensor], split: SplitData
) -> list[str]:
    """test_rankings.jsonl lines: per user the true item, its ranks and the candidates ordered by the LLM's score."""
    letters = candidate_letters(scores.shape[1])
    rankings = []
    for k, (e, row) in enumerate(zip(examples, scores.tolist(), strict=True)):
        order = sorted(range(len(row)), key=lambda c: -row[c])
        record = {
            "user": split.user_raw_ids[e.user],
            "true_item": split.item_raw_ids[e.candidates[e.label]],
            "llm_rank": int(ranks["llm"][k]),  # ties pessimistic, as in the metrics
            "retriever_rank": e.retriever_rank,
        }
        if "fused" in ranks:
            record["fused_rank"] = int(ranks["fused"][k])
        record["candidates"] = [
            {
                "item": split.item_raw_ids[e.candidates[c]],
                "letter": letters[c],
                "score": row[c],
                "retriever_score": e.retriever_scores[c],
            }
            for c in order
        ]
        rankings.append(json.dumps(record, ensure_ascii=False))
    return rankings


def _ci_text(stats: dict) -> str:
    low, high = stats["ci95"]
    verdict = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
    return f"{stats['diff']:+.4f} [{low:+.4f}, {high:+.4f}] {verdict}"


def format_table(report: dict, ks: tuple[int, ...], llm_name: str) -> str:
    names = [f"{m}@{k}" for k in ks for m in ("Recall", "NDCG", "MRR") if not (m != "Recall" and k == 1)]
    short = [n.replace("Recall", "R").replace("NDCG", "N").replace("MRR", "M") for n in names]
    lines = [f"{'':42}" + "".join(f"{s:>8}" for s in short)]
    subset, overall = report["subset"], report["overall"]
    weight = report.get("fusion", {}).get("weight")
    rows = [
        (f"retriever, subset ({report['users_subset']} users)", subset["retriever"]),
        ("random order, subset", subset["random"]),
        (f"{llm_name} ranker, subset", subset["llm"]),
    ]
    if "fused" in subset:
        rows.append((f"fused (w={weight}), subset", subset["fused"]))
    rows += [
        (f"retriever, all {report['users_all']} users", overall["retriever"]),
        ("LlamaRec (retriever + ranker), all", overall["llm"]),
    ]
    if "fused" in overall:
        rows.append(("LlamaRec fused, all", overall["fused"]))
    for label, metrics in rows:
        lines.append(f"{label[:42]:42}" + "".join(f"{metrics[n]:8.4f}" for n in names))
    lines.append(
        f"coverage (true item in the candidates): {report['users_subset']}/{report['users_all']}"
        f" = {report['coverage']:.4f}"
    )
    lines.append("minus the retriever's order, mean over users [95% paired bootstrap CI]:")
    sections = [(f"test ({report['users_subset']} users)", report["test_vs_retriever"])]
    if report.get("val"):
        sections.append((f"validation ({report['val']['users']} users)", report["val"]["vs_retriever"]))
    for title, comparisons in sections:
        for name, label in (("llm", "ranker"), ("fused", "fused")):
            if name in comparisons:
                stats = comparisons[name]
                lines.append(
                    f"  {label:6} {title:24} N@10 {_ci_text(stats['NDCG@10'])}; R@10 {_ci_text(stats['Recall@10'])}"
                )
    return "\n".join(lines)


def write_prompts_sample(path: Path, examples: list[EvalExample], builder: PromptBuilder, split: SplitData) -> None:
    """The exact prompt text of the first 20 test users, with raw user/item ids (what the LLM sees)."""
    lines = []
    for e in examples[:20]:
        record = {
            "user": split.user_raw_ids[e.user],
            "candidates": [split.item_raw_ids[i] for i in e.candidates],
            "true_item": split.item_raw_ids[e.candidates[e.label]],
            "true_letter": true_letter(e),
            "prompt_tokens": len(e.input_ids),
            "prompt": builder.tokenizer.decode(e.input_ids, skip_special_tokens=True)
            if len(e.input_ids) >= builder.max_text_len
            else builder.text(e.history, e.candidates),
        }
        lines.append(json.dumps(record, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def test_and_report(
    model,
    val_set: list[EvalExample],
    test_set: list[EvalExample],
    test_part: dict,
    split: SplitData,
    letter_ids: torch.Tensor,
    pad_id: int,
    eval_batch: int,
    device: torch.device,
    fusion: bool,
    seed: int,
) -> tuple[dict, list[str]]:
    """The final validation (the fusion weight, the validation comparison), then the test: (report, rankings)."""
    val_scores = rank_examples(model, val_set, letter_ids, pad_id, eval_batch, device, "validation users")
    chosen = choose_fusion_weight(val_scores, val_set) if fusion else None
    start = time.time()
    scores = rank_examples(model, test_set, letter_ids, pad_id, eval_batch, device, "test users")
    seconds = time.time() - start
    weight = chosen["weight"] if chosen else None
    report, rankings = build_test_report(scores, test_set, test_part, split, REPORT_KS, weight, seed)
    report["val"] = compare_with_retriever(val_scores, val_set, weight, seed)
    if chosen:
        report["fusion"] = chosen
    report["timing"] = {"test_seconds": round(seconds, 2), "test_users_per_s": round(len(test_set) / seconds, 3)}
    return report, rankings


def write_results(run_dir: Path, result: dict, rankings: list[str]) -> None:
    """test_rankings.jsonl, then test_metrics.json (written last: a run folder with it is complete), each written
    whole or not at all."""
    atomic_write_text(run_dir / "test_rankings.jsonl", "\n".join(rankings) + "\n")
    atomic_write_json(run_dir / "test_metrics.json", result)
