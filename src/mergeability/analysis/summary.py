"""What a finished run amounts to, as numbers and as the rows the console and the report both print."""

from __future__ import annotations

from collections import Counter

from mergeability import run


def example_summary(cfg, store, pool: list[str]) -> dict:
    """Counts, base accuracy, mean score and the score histogram of an example-level run."""
    items, kept = store.item_outcomes(), store.update_outcomes()
    M = cfg.merge.trials
    sc = run.scores(store, run.run_key(cfg), pool, M)
    hist = Counter(round(v * M) for v in sc.values())
    return {
        "screened": len(items),
        "base_accuracy": sum(items) / max(len(items), 1),
        "trained": len(kept),
        "kept": sum(kept),
        "scored": len(sc),
        "trials": store.count("trials"),
        "mean_score": sum(sc.values()) / max(len(sc), 1),
        "histogram": {f"{k / M:.2f}": hist.get(k, 0) for k in range(M + 1)},
        "leakage": store.get_meta("leakage"),  # the run's leakage audit; None for a run from before it existed
    }


def example_summary_rows(s: dict, *, console: bool = False) -> list[list[str]]:
    """(label, value) rows; the console adds the histogram and stage times, the report the trial counts."""
    rows = [["items screened", str(s["screened"])],
            ["base accuracy", f"{s['base_accuracy']:.1%}"],
            ["trained (base-wrong)", str(s["trained"])],
            ["kept (flipped to correct)", f"{s['kept']} ({s['kept'] / max(s['trained'], 1):.0%})"]]
    if not console:
        rows += [["scored updates", str(s["scored"])], ["trials recorded", str(s["trials"])]]
    rows.append(["mean mergeability score", f"{s['mean_score']:.3f}"])
    if s.get("leakage") is not None:
        rows.append(["leaking updates", f"{s['leakage']['leaking']} of {s['leakage']['audited']}"])
    if console:
        rows += [[f"  score {k}", f"{v:3d} " + "█" * v] for k, v in s["histogram"].items()]
        rows += [[f"time: {k}", f"{v:.1f} s"] for k, v in s.get("timings", {}).items()]
    return rows


def task_summary(cfg, store, pool: list[str]) -> dict:
    """Per-task base, fine-tuned accuracy and score, and the mean score of a task-level run's pool."""
    sc = run.task_scores(cfg, store, pool)
    rows = [{k: r[k] for k in ("name", "base_acc", "ft_acc")} for r in store.task_rows()]
    return {"tasks": len(rows), "kept": len(pool), "threshold": cfg.data.threshold, "scored": len(sc),
            "trials": store.count("trials"), "per_task": [{**r, "score": sc.get(r["name"])} for r in rows],
            "mean_score": sum(sc.values()) / max(len(sc), 1)}


def task_summary_rows(s: dict) -> list[list[str]]:
    return [["tasks", str(s["tasks"])], [f"kept (fine-tuned accuracy ≥ {s['threshold']:g})", str(s["kept"])],
            ["scored tasks", str(s["scored"])], ["trials recorded", str(s["trials"])],
            ["mean mergeability score", f"{s['mean_score']:.3f}"]]


def per_task_rows(s: dict) -> list[list[str]]:
    def score(r):
        return "—" if r["score"] is None else f"{r['score']:.2f}"
    return [[r["name"], f"{r['base_acc']:.2f}", f"{r['ft_acc']:.2f}", score(r)] for r in s["per_task"]]
