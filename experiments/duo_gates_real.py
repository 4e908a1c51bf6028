"""DuoAttention's learned gates on a real catalogue model, once: what they find, and at what cost.

The gates (`rh_lens.detection.methods.duo_gates`, lr 0.02 and L1 0.05 as DuoAttention's
published runs) are trained on NIAH A's 1,000-token trials (the 3 built-in needles in the pydoc
haystack, depths 0/25/50/75/100: 15 trials; `GateTraining.max_tokens` leaves longer ones out
for memory) for `--steps` steps, and compared with the retrieval score's map from the same
traced decoding, at the level the gates live on (KV heads: a KV head's retrieval score is its
best query head's, as `compress` ranks them): Spearman, and the overlap of the KV heads each
keeps full at 25%. Writes experiments/results/duo_gates_<model>.json.

    OMP_NUM_THREADS=1 python experiments/duo_gates_real.py --model smollm2-135m --steps 40
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from common import RESULTS_DIR
from scipy import stats

from rh_lens.detection.methods import METHODS
from rh_lens.detection.methods.base import head_map
from rh_lens.detection.methods.duo_gates import GateTraining
from rh_lens.detection.methods.duo_gates import trial_scores as gate_scores
from rh_lens.detection.trace import trace_trials
from rh_lens.execution.files import write_json
from rh_lens.interventions.compression import kv_head_scores
from rh_lens.model.loading import load_model
from rh_lens.tasks.niah import Grid


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--full-fraction", type=float, default=0.25)
    args = parser.parse_args(argv)
    model = load_model(args.model)
    grid = Grid(lengths=(1000,))
    trials = grid.trials(model.tokenizer, model.cfg.n_ctx)
    started = time.perf_counter()
    traced = trace_trials(model, trials)
    traced_s = time.perf_counter() - started
    training = GateTraining(steps=args.steps)
    started = time.perf_counter()
    gates = head_map("duo-gates", partial(gate_scores, training=training), model, traced)
    training_s = time.perf_counter() - started
    retrieval = head_map("retrieval", METHODS["retrieval"], model, traced)
    n_kv = model.cfg.n_key_value_heads or model.cfg.n_heads
    kv_gates = kv_head_scores(gates.scores().float(), n_kv).flatten()
    kv_retrieval = kv_head_scores(retrieval.scores().float(), n_kv).flatten()
    keep = max(1, round(args.full_fraction * kv_gates.numel()))
    top_gates = set(torch.topk(kv_gates, keep).indices.tolist())
    top_retrieval = set(torch.topk(kv_retrieval, keep).indices.tolist())
    result = {
        "model": args.model,
        "trials": len(trials),
        "trials_trained_on": sum(len(t.trial.prompt_ids) <= training.max_tokens for t in traced),
        "training": vars(training),
        "trace_seconds": traced_s,
        "training_seconds": training_s,
        "seconds_per_step": training_s / args.steps,
        "kv_heads": kv_gates.numel(),
        "gates": kv_gates.tolist(),
        "gates_above_0.5": int((kv_gates > 0.5).sum()),
        "spearman_with_retrieval": float(stats.spearmanr(kv_gates.numpy(), kv_retrieval.numpy()).statistic),
        "full_fraction": args.full_fraction,
        "kv_heads_kept_full": keep,
        "overlap_with_retrieval_policy": len(top_gates & top_retrieval) / keep,
        "machine": "2-core x86_64 CPU, no GPU, torch 2.13.0 CPU, float32, one thread",
    }
    path = RESULTS_DIR / f"duo_gates_{args.model}.json"
    write_json(path, result)
    print({k: v for k, v in result.items() if k != "gates"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
