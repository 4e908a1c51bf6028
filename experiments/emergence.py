"""Do retrieval heads emerge reliably? Train small models from scratch and watch them form.

Small HookedTransformers (2 layers x 4 heads, d_model 64, rotary positions; attention-only,
and with MLPs) are trained from scratch on the synthetic retrieval task of
`rh_lens.tasks.synthetic` (a key-value needle in filler sentences, asked about at the end, the
NIAH prompt form), several seeds each, and a control run on the same sequences whose
answers are drawn afresh (no retrieval demand). At every checkpoint: training loss, loss on the answer tokens, NIAH
accuracy on held-out trials and rh_lens's detection on them (`rh_lens.detection.run`,
the paper's scoring rule), plus each head's induction score on a repeated random sequence.
At the end, per run: masking the detected retrieval heads vs random heads (the `ablate`
machinery), head-output patching (the `patch` machinery), masking the heads patching ranks
first, and each head's copy offset (`copy_offsets`).

Writes `<out>/runs/<variant>-seed<k>.json` and `.pt` (history and trained weights, per run
as it finishes: a rerun skips the finished ones), `<out>/emergence.json`, `emergence.md`
(the per-seed table) and the figures `emergence.png` (head scores over training, loss and accuracy on the same axis, one panel
per run) and `final_heads.png` (each run's final head map).

    python experiments/emergence.py                 # defaults: 5 seeds x 3 variants
    python experiments/emergence.py --pythia EleutherAI/pythia-70m --checkpoints 1000 8000 143000
    (the second needs hub access: the same detection on Pythia's published checkpoints)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
from common import RESULTS_DIR
from tqdm.auto import tqdm

from rh_lens.app.plots import head_map
from rh_lens.detection import methods
from rh_lens.detection.probes import repeat_attention
from rh_lens.detection.run import detect
from rh_lens.detection.scoring import DEFAULT_THRESHOLD, retrieval_scores
from rh_lens.detection.trace import trace_trials
from rh_lens.errors import PairError
from rh_lens.execution.files import write_json
from rh_lens.execution.options import RunOptions
from rh_lens.heads import Head
from rh_lens.interventions.masking import MaskingOptions, ablation_experiment, evaluate_niah
from rh_lens.interventions.patching import activation_patching, patching_pair
from rh_lens.tasks.synthetic import Batches, SyntheticTask, tiny_model, train_step

VARIANTS = {  # name -> (MLPs?, retrieval demand?)
    "attn-only": (False, True),
    "mlp": (True, True),
    "control": (False, False),
}


def head_maps(model, trials) -> dict:
    """Detection on held-out trials: NIAH accuracy, the paper's scores (successful trials),
    the same rule over every trial (meaningful when nothing succeeds, e.g. the control), and
    the induction scores."""
    result = detect(model, trials, options=RunOptions(progress=False, max_new_tokens=task_answer_budget(trials)))
    trial_scores = torch.tensor([r.head_scores for r in result.trials])
    _, induction = repeat_attention(model, length=60)
    return {
        "niah": float(np.mean([r.success for r in result.trials])),
        "recall": float(np.mean([r.rouge_recall for r in result.trials])),
        "scores": result.scores().tolist(),
        "all_trial_scores": retrieval_scores(trial_scores, torch.ones(len(trial_scores), dtype=torch.bool)).tolist(),
        "induction": induction.tolist(),
    }


def task_answer_budget(trials) -> int:
    return max(len(t.needle.real_needle.split()) for t in trials) + 2


def copy_offsets(model, trials) -> dict[str, list]:
    """Where each head looks, relative to the prompt position of the token the model copies
    (`rh_lens.detection.methods.copy_offsets`): per head, its most common offset >= 0 and its
    share of the steps that emit the answer in order (None for a head never at or after the
    token). The retrieval score credits a head only at offset 0; a head that reads the token
    from a later position's residual (where an earlier layer has moved it) copies at another
    offset and scores 0. (Runs before this used [offset, count, share], negative offsets allowed.)"""
    options = RunOptions(max_new_tokens=task_answer_budget(trials), progress=False)
    offsets, shares = methods.copy_offsets(trace_trials(model, trials, options), model.cfg.n_layers, model.cfg.n_heads)
    return {
        str(Head(layer, head)): [int(offsets[layer, head]), float(shares[layer, head])] if shares[layer, head] > 0 else None
        for layer in range(model.cfg.n_layers)
        for head in range(model.cfg.n_heads)
    }


def final_tests(model, task: SyntheticTask, trials, seed: int) -> dict:
    """Masking the detected heads vs random ones, head-output patching, masking the heads
    patching ranks first, and copy offsets, on the trained model."""
    detection = detect(model, trials, options=RunOptions(progress=False, max_new_tokens=task_answer_budget(trials)))
    heads = detection.retrieval_heads()
    out: dict = {
        "retrieval_heads": [str(Head(layer, head)) for layer, head, _ in heads],
        "niah": float(np.mean([r.success for r in detection.trials])),
        "scores": detection.scores().tolist(),
        "copy_offsets": copy_offsets(model, trials),
    }
    # Random heads are drawn from outside every head >= the threshold: in an 8-head model
    # with 5 such heads, the top 3 are masked against the other 3.
    k = min(len(heads), model.cfg.n_layers * model.cfg.n_heads - len(heads))
    if k > 0:
        ablation = ablation_experiment(
            model,
            trials,
            detection,
            MaskingOptions(ks=(k,), seeds=(0, 1, 2)),
            options=RunOptions(progress=False, max_new_tokens=task_answer_budget(trials)),
        )
        out["masking"] = {
            c.metadata["kind"] + (f"-seed{c.seed}" if c.seed is not None else ""): c.mean_recall() for c in ablation.conditions
        }
        out["masking"]["k"] = k
    # Patching: the same trial with another value sequence (same length, other tokens).
    generator = torch.Generator().manual_seed(10_000 + seed)
    tokenizer = model.tokenizer
    needle = task.needle(generator)
    corrupted = " ".join(f"f{(int(w[1:]) + task.n_filler // 2) % task.n_filler:02d}" for w in needle.real_needle.split())
    haystack_ids = tokenizer(task.haystack(60, generator), add_special_tokens=False)["input_ids"]
    try:
        pair = patching_pair(
            model,
            needle,
            haystack_ids,
            trials[-1].context_length,
            50,
            corrupted,
            chat=False,
            haystack="synthetic",
            max_new_tokens=task_answer_budget(trials),
        )
        patched = activation_patching(model, pair, kinds=("head_out",), directions=("denoise",), progress=False)
        out["patching"] = {"ranking": [[str(Head(layer, head)), effect] for layer, head, effect in patched.ranking()]}
        # The same masking for the heads patching ranks first (as many as above, at least one).
        best = [Head(layer, head) for layer, head, _ in patched.ranking()[: max(1, k)]]
        records = evaluate_niah(
            model, trials, best, options=RunOptions(progress=False, max_new_tokens=task_answer_budget(trials))
        )
        out["masking_patched"] = {"heads": [str(h) for h in best], "recall": float(np.mean([r.rouge_recall for r in records]))}
    except PairError as e:  # a model that cannot tell the answers apart has nothing to patch
        out["patching"] = {"error": str(e)}
    return out


def train_run(task: SyntheticTask, variant: str, seed: int, args) -> tuple[dict, object]:
    mlp, retrieval = VARIANTS[variant]
    torch.manual_seed(seed)
    model = tiny_model(
        task, n_layers=args.layers, n_heads=args.heads, d_model=args.d_model, attn_only=not mlp, n_ctx=args.n_ctx, seed=seed
    )
    batches = Batches(task, model.tokenizer, args.min_filler, args.max_filler, retrieval=retrieval)
    trials = task.trials(model.tokenizer, args.eval_trials, tuple(args.lengths), seed=1_000 + seed, n_ctx=args.n_ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    generator = torch.Generator().manual_seed(seed)
    history, losses, started = [], [], time.perf_counter()
    with tqdm(total=args.steps, desc=f"{variant} seed {seed}", unit="step") as bar:
        for step in range(args.steps + 1):
            if step % args.every == 0:
                loss, answer_loss = np.mean(losses, axis=0) if losses else (float("nan"), float("nan"))
                history.append({"step": step, "loss": float(loss), "answer_loss": float(answer_loss), **head_maps(model, trials)})
                bar.set_postfix(
                    answer_loss=f"{answer_loss:.2f}",
                    niah=f"{history[-1]['niah']:.2f}",
                    best=f"{np.max(history[-1]['scores']):.2f}",
                )
                losses = []
            if step < args.steps:
                losses.append(
                    train_step(model, optimizer, *batches(args.batch_size, generator), answer_weight=args.answer_weight)
                )
                schedule.step()
                bar.update()
    final = final_tests(
        model,
        task,
        task.trials(model.tokenizer, args.final_trials, tuple(args.lengths), seed=2_000 + seed, n_ctx=args.n_ctx),
        seed,
    )
    return {"variant": variant, "seed": seed, "history": history, "final": final, "seconds": time.perf_counter() - started}, model


# --- summaries ----------------------------------------------------------------------------


def first_step(history: list[dict], test) -> int | None:
    return next((h["step"] for h in history if test(h)), None)


def summary(run: dict, threshold: float = DEFAULT_THRESHOLD) -> dict:
    """When things happen in one run: the first checkpoint where some head scores >= the
    threshold (the paper's rule), where NIAH accuracy reaches 50%, where the answer loss is
    clearly below what a model that does not look back can reach; the final head map's
    retrieval heads with their induction scores; masking, patching and copy offsets."""
    history = run["history"]
    task = SyntheticTask()
    # Without looking back, the best guess of each answer word is uniform over the filler
    # words (EOS is free): this floor, less half a nat, is "the model retrieves".
    floor = task.answer_tokens * np.log(task.n_filler) / (task.answer_tokens + 1)
    last = history[-1]
    scores, induction = np.array(last["scores"]), np.array(last["induction"])
    best = np.unravel_index(np.argmax(np.array(last["all_trial_scores"])), scores.shape)
    masking = run["final"].get("masking", {})
    randoms = [v for name, v in masking.items() if name.startswith("random")]
    ranking = run["final"]["patching"].get("ranking", [])
    return {
        "variant": run["variant"],
        "seed": run["seed"],
        "head_step": first_step(history, lambda h: np.max(h["scores"]) >= threshold),
        "niah_step": first_step(history, lambda h: h["niah"] >= 0.5),
        "loss_step": first_step(history[1:], lambda h: h["answer_loss"] < floor - 0.5),
        "final_niah": last["niah"],
        "answer_loss": last["answer_loss"],
        "retrieval_heads": run["final"]["retrieval_heads"],
        "best_head": str(Head(int(best[0]), int(best[1]))),
        "best_all_trial_score": float(np.max(last["all_trial_scores"])),
        "best_head_induction": float(induction[best]),
        "max_induction": float(induction.max()),
        "recall_none": masking.get("none"),
        "recall_top": masking.get("top"),
        "recall_random": float(np.mean(randoms)) if randoms else None,
        "patching_top": ranking[0] if ranking else None,
        "recall_patched_masked": run["final"].get("masking_patched", {}).get("recall"),
        "patching_top_offset": run["final"]["copy_offsets"].get(ranking[0][0]) if ranking else None,
        "offsets": {head: o for head, o in run["final"]["copy_offsets"].items() if o and o[-1] >= 0.5},
    }


def table(rows: list[dict]) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [
        "| variant | seed | head >= 0.1 at step | NIAH >= 50% at step | answer loss 0.5 nat under the no-retrieval floor at step | final NIAH | retrieval heads (>= 0.1) | induction score of the best head (max of any head) | recall: no mask / retrieval heads masked / random masked / top heads by patching masked | top head by patching (effect) | its copy offset (share of steps) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        patch = f"{r['patching_top'][0]} ({r['patching_top'][1]:.2f})" if r["patching_top"] else "-"
        offset = f"{r['patching_top_offset'][0]:+d} ({r['patching_top_offset'][-1]:.0%})" if r["patching_top_offset"] else "-"
        lines.append(
            f"| {r['variant']} | {r['seed']} | {fmt(r['head_step'])} | {fmt(r['niah_step'])} | {fmt(r['loss_step'])} | {fmt(r['final_niah'])} "
            f"| {', '.join(r['retrieval_heads']) or 'none'} | {r['best_head']}: {fmt(r['best_head_induction'])} ({fmt(r['max_induction'])}) "
            f"| {fmt(r['recall_none'])} / {fmt(r['recall_top'])} / {fmt(r['recall_random'])} / {fmt(r['recall_patched_masked'])} | {patch} | {offset} |"
        )
    return "\n".join(lines) + "\n"


# --- figures ------------------------------------------------------------------------------


def plot_emergence(runs: list[dict], path: Path) -> None:
    """One panel per run: each head's retrieval score over steps (the paper's rule; dashed: the
    same rule over every trial), answer loss and NIAH accuracy on a twin axis."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    fig, axes = plt.subplots(
        len(variants), len(seeds), figsize=(3.2 * len(seeds), 2.6 * len(variants)), squeeze=False, sharex=True, sharey=True
    )
    for run in runs:
        ax = axes[variants.index(run["variant"])][seeds.index(run["seed"])]
        steps = [h["step"] for h in run["history"]]
        scores = np.array([h["scores"] for h in run["history"]])  # [checkpoint, layer, head]
        every = np.array([h["all_trial_scores"] for h in run["history"]])
        n_layers, n_heads = scores.shape[1:]
        colours = plt.cm.tab10(np.arange(n_layers * n_heads) % 10)
        for i in range(n_layers * n_heads):
            layer, head = divmod(i, n_heads)
            ax.plot(steps, scores[:, layer, head], color=colours[i], lw=1.2, label=f"{layer}-{head}")
            ax.plot(steps, every[:, layer, head], color=colours[i], lw=0.6, ls="--")
        ax.axhline(DEFAULT_THRESHOLD, color="grey", lw=0.5)
        ax.set_ylim(-0.02, 1.02)
        twin = ax.twinx()
        twin.plot(steps, [h["niah"] for h in run["history"]], color="black", lw=2, label="NIAH accuracy")
        answer = [h["answer_loss"] for h in run["history"]]
        top = np.nanmax(answer) if not np.all(np.isnan(answer)) else 1.0
        twin.plot(steps, np.array(answer) / top, color="black", lw=1, ls=":", label="answer loss (/ max)")
        twin.set_ylim(-0.02, 1.02)
        twin.set_yticks([])
        ax.set_title(f"{run['variant']}, seed {run['seed']}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for row in axes:
        row[0].set_ylabel("retrieval score")
    handles, labels = axes[0][0].get_legend_handles_labels()
    extra, extra_labels = axes[0][0].figure.axes[-1].get_legend_handles_labels()
    fig.legend(
        handles + extra, labels + extra_labels, loc="lower center", ncol=min(12, len(labels) + 2), fontsize=8, frameon=False
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_final_heads(runs: list[dict], path: Path) -> None:
    """Each run's final head map (the paper's scores), heads >= the threshold outlined."""
    import matplotlib.pyplot as plt

    variants = list(dict.fromkeys(r["variant"] for r in runs))
    seeds = sorted({r["seed"] for r in runs})
    fig, axes = plt.subplots(
        len(variants),
        len(seeds),
        figsize=(1.8 * len(seeds) + 1, 2.0 * len(variants) + 0.5),
        squeeze=False,
        constrained_layout=True,
    )
    for run in runs:
        ax = axes[variants.index(run["variant"])][seeds.index(run["seed"])]
        scores = np.array(run["history"][-1]["scores"])
        image = head_map(ax, scores, DEFAULT_THRESHOLD)
        ax.set_xticks(range(scores.shape[1]))
        ax.set_yticks(range(scores.shape[0]))
        ax.set_title(f"{run['variant']} s{run['seed']}", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("head", fontsize=8)
    for row in axes:
        row[0].set_ylabel("layer", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="retrieval score")
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Pythia's published checkpoints (hub access needed) -------------------------------------


def pythia_sweep(args) -> None:
    """The same detection on a model's published training checkpoints."""
    from rh_lens.app.workflows import detect_grid
    from rh_lens.tasks.niah import Grid

    out = Path(args.out) / "pythia"
    rows = []
    for step in args.checkpoints:
        result, _ = detect_grid(
            args.pythia,
            Grid(lengths=tuple(args.pythia_lengths)),
            out / f"step{step}",
            checkpoint=step,
            options=RunOptions(resume=True, device=args.device),
        )
        rows.append(
            {
                "step": step,
                "scores": result.scores().tolist(),
                "retrieval_heads": [str(Head(l, h)) for l, h, _ in result.retrieval_heads()],
            }
        )
        print(f"step {step}: {len(rows[-1]['retrieval_heads'])} heads >= 0.1", flush=True)
    write_json(out / "checkpoints.json", rows)


def run_or_load(variant: str, seed: int, args) -> dict:
    """One run, or its saved result when an earlier (interrupted) invocation finished it."""
    path = args.out / "runs" / f"{variant}-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    run, model = train_run(SyntheticTask(), variant, seed, args)
    torch.save(model.state_dict(), path.with_suffix(".pt"))  # the trained weights, for a closer look
    write_json(path, run)
    s = summary(run)
    print(
        f"{variant} seed {seed}: {run['seconds']:.0f} s; head >= 0.1 at step {s['head_step']}, NIAH >= 50% at step {s['niah_step']}, "
        f"final NIAH {s['final_niah']:.2f}, heads {s['retrieval_heads']}",
        flush=True,
    )
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument(
        "--answer-weight",
        type=float,
        default=3.0,
        help="extra weight of the answer tokens' loss (they are a few percent of the tokens; with weight 0, 2000-3000 steps learned nothing)",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-ctx", type=int, default=256)
    parser.add_argument("--min-filler", type=int, default=10, help="filler tokens per training sequence, at least")
    parser.add_argument("--max-filler", type=int, default=100)
    parser.add_argument(
        "--lengths",
        nargs="+",
        type=int,
        default=[240, 270, 300],
        help="held-out trial lengths (a trial's length counts 200 tokens for the question, as rh-lens's do)",
    )
    parser.add_argument("--eval-trials", type=int, default=4, help="held-out trials per length at each checkpoint")
    parser.add_argument("--final-trials", type=int, default=8, help="held-out trials per length for the final masking")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "emergence")
    parser.add_argument(
        "--pythia", help="a TransformerLens name with training checkpoints, e.g. EleutherAI/pythia-70m (needs hub access)"
    )
    parser.add_argument("--checkpoints", nargs="+", type=int, default=[1000, 4000, 16000, 64000, 143000])
    parser.add_argument("--pythia-lengths", nargs="+", type=int, default=[500, 1000, 1500])
    parser.add_argument("--device", default=None)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained side by side, one thread each")
    args = parser.parse_args(argv)
    if args.pythia:
        pythia_sweep(args)
        return
    (args.out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    todo = [(variant, seed) for variant in args.variants for seed in range(args.seeds)]
    if args.jobs > 1:  # one thread per process: two torch processes sharing cores slow each other down badly
        with multiprocessing.get_context("spawn").Pool(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            runs = pool.starmap(run_or_load, [(variant, seed, args) for variant, seed in todo])
    else:
        runs = [run_or_load(variant, seed, args) for variant, seed in todo]
    rows = [summary(run) for run in runs]
    write_json(
        args.out / "emergence.json",
        {"settings": {k: str(v) for k, v in vars(args).items()}, "summary": rows, "seconds": time.perf_counter() - started},
    )
    (args.out / "emergence.md").write_text(table(rows))
    plot_emergence(runs, args.out / "emergence.png")
    plot_final_heads(runs, args.out / "final_heads.png")
    print(table(rows), flush=True)


if __name__ == "__main__":
    main()
