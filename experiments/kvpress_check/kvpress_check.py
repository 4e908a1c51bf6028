"""Cross-check rh_lens's KV-cache compression against kvpress's DuoAttentionPress.

The same head split (a retrieval policy exported by `rh-lens compress` in DuoAttention's
format), the same sink and recent window, the same NIAH prompts (token ids), the same model
weights (the dequantized HF directory in rh_lens's cache), greedy decoding in the same order
(prefill the prompt minus its last token, then one token per step, stop at a newline or
EOS): do the two give the same answers? rh_lens masks at decode steps only (`--decode-only`),
which is what a press does: the prompt is prefilled with full attention, and streaming heads
then see only their sink and recent tokens of it. One difference remains: rh_lens's window
slides over the generated tokens, a press keeps every generated token.

Three steps, two environments:

1. rh_lens's environment: the run, and its prompts
     rh-lens compress --model smollm2-135m --scores runs/demo/results.json --decode-only \\
         --full-fraction 0.25 --sink 4 --window 256 --lengths 4000 --out runs/compress-kv
     python experiments/kvpress_check/kvpress_check.py prompts --model smollm2-135m \\
         --compression runs/compress-kv/compression.json --out runs/kvpress/prompts.json
2. kvpress's environment (requirements.txt here):
     python experiments/kvpress_check/kvpress_check.py run --prompts runs/kvpress/prompts.json \\
         --split runs/compress-kv/duo_attention/0.25 --out runs/kvpress/kvpress.json
3. either: python experiments/kvpress_check/kvpress_check.py compare \\
         --compression runs/compress-kv/compression.json --kvpress runs/kvpress/kvpress.json \\
         --json experiments/results/kvpress_check_smollm2-135m_0.25.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def prompts(args) -> None:
    """Write the grid's prompts (token ids, answers) and the model's HF directory."""
    from rh_lens.model.loading import hf_directory, load_model_spec
    from rh_lens.tasks.data import load_needles
    from rh_lens.tasks.niah import Grid

    run = json.loads(Path(args.compression).read_text())
    settings = run["settings"]
    spec = load_model_spec(args.model, device="cpu")
    needles = load_needles(args.needles) if args.needles else None
    grid = Grid(
        lengths=tuple(settings["lengths"]),
        depths=tuple(settings["depths"]),
        haystacks=tuple(settings["haystack"]),
        prompt=settings["prompt"],
        **({"needles": tuple(needles)} if needles else {}),
    )
    trials = grid.trials(spec.tokenizer, spec.cfg.n_ctx)
    out = {
        "model_dir": str(hf_directory(args.model)),
        "max_new_tokens": settings["max_new_tokens"],
        "trials": [{"key": t.key, "prompt_ids": t.prompt_ids, "answer": t.needle.real_needle} for t in trials],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out))
    print(f"wrote {len(trials)} prompts to {args.out}")


def run(args) -> None:
    """Greedy answers under DuoAttentionPress with the exported split (kvpress's environment)."""
    import numpy as np
    import torch
    from kvpress import DuoAttentionPress
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = json.loads(Path(args.prompts).read_text())
    split = np.loadtxt(Path(args.split) / "full_attention_heads.tsv", delimiter="\t", ndmin=2)  # 1 = full, 0 = streaming
    config = json.loads((Path(args.split) / "config.json").read_text())

    class SplitPress(DuoAttentionPress):
        @staticmethod
        def load_attention_pattern(model):  # this split instead of a download
            return config["sink_size"], config["recent_size"], split

    press = SplitPress(head_compression_ratio=float((split == 0).mean()))
    model = AutoModelForCausalLM.from_pretrained(data["model_dir"], dtype=torch.float32, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(data["model_dir"])
    stops = {tokenizer.eos_token_id} | {
        tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<end_of_turn>", "<|endoftext|>")
    }
    answers = {}
    with torch.inference_mode(), press(model):
        for trial in data["trials"]:
            ids = torch.tensor([trial["prompt_ids"]])
            cache = model(ids[:, :-1], use_cache=True).past_key_values  # the press compresses here
            token, tokens = ids[:, -1:], []
            for _ in range(data["max_new_tokens"]):
                logits = model(token, past_key_values=cache, use_cache=True).logits
                tokens.append(int(logits[0, -1].argmax()))
                if tokens[-1] in stops or "\n" in tokenizer.decode(tokens[-1:]):
                    break
                token = torch.tensor([tokens[-1:]])
            answers[trial["key"]] = {
                "generated_ids": tokens,
                "response": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
            }
            print(trial["key"], repr(answers[trial["key"]]["response"]), flush=True)
    Path(args.out).write_text(
        json.dumps({"split": str(args.split), "sink": config["sink_size"], "recent": config["recent_size"], "answers": answers})
    )


def compare(args) -> None:
    """Trials where rh_lens's retrieval policy and kvpress gave the same response."""
    ours = json.loads(Path(args.compression).read_text())
    theirs = json.loads(Path(args.kvpress).read_text())
    fraction = float(Path(theirs["split"]).name)
    # rh_lens.compression/2 keeps what a condition is under "metadata" (/1 had it at the top level)
    (condition,) = [
        c
        for c in ours["conditions"]
        if c.get("metadata", c)["method"] == "retrieval" and c.get("metadata", c)["full_fraction"] == fraction
    ]
    same_text = same_tokens = 0
    for record in condition["records"]:
        other = theirs["answers"][record["key"]]
        same_text += record["response"] == other["response"]
        same_tokens += record["generated_ids"] == other["generated_ids"]
        if record["response"] != other["response"]:
            print(f"{record['key']}: rh_lens {record['response']!r} | kvpress {other['response']!r}")
    n = len(condition["records"])
    print(
        f"same response in {same_text}/{n} trials, same tokens in {same_tokens}/{n} (retrieval policy, {fraction:g} of KV heads full)"
    )
    if args.json:
        result = {"compression": str(args.compression), "kvpress": str(args.kvpress), "full_fraction": fraction}
        result |= {"sink": theirs["sink"], "recent": theirs["recent"], "trials": n}
        result |= {"same_response": same_text, "same_tokens": same_tokens}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    p = steps.add_parser("prompts")
    p.add_argument("--model", required=True)
    p.add_argument("--compression", required=True, help="compression.json of the rh-lens compress run")
    p.add_argument("--needles", default=None)
    p.add_argument("--out", required=True)
    r = steps.add_parser("run")
    r.add_argument("--prompts", required=True)
    r.add_argument("--split", required=True, help="a duo_attention/<fraction> directory of the rh-lens compress run")
    r.add_argument("--out", required=True)
    c = steps.add_parser("compare")
    c.add_argument("--compression", required=True)
    c.add_argument("--kvpress", required=True)
    c.add_argument("--json", help="also write the counts as plain data to this file (e.g. experiments/results/...)")
    args = parser.parse_args()
    {"prompts": prompts, "run": run, "compare": compare}[args.step](args)


if __name__ == "__main__":
    main()
