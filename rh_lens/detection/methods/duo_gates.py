"""DuoAttention's learned gates (Xiao et al., 2024): one gate per KV head, in [0, 1], mixing
the head's full attention with streaming attention (the first `sink` keys and the `window`
most recent, `KVPolicy.keeps`): output = gate * full + (1 - gate) * streaming. With the model
frozen, the gates are trained so that the final hidden states at the answer positions stay
the full model's (mean squared difference), under an L1 penalty that pushes every gate to 0
(streaming); a gate that stays high marks a head that needs the whole context.

Matched to DuoAttention's code (mit-han-lab/duo-attention @ fe93c31; each line is cited next
to the code below): gates start at 1 and are clamped to [0, 1] before every step and again
where they mix the two attentions; AdamW, no weight decay; the loss is the distillation term
(squared difference averaged over the hidden size and the supervised positions) plus `l1` x
the mean gate; the learning rate ramps up over the first fifth of the steps and down over the
last fifth, capped at `lr`; lr 0.02 and L1 weight 0.05, the values of every published run
(`scripts/run_train.sh`; 0.1 is only `parse_args`'s default, which no published run uses).

Where rh_lens differs, and why:
- data: the traced trials (their prompt and the answer the model gave, supervising the
  positions that predict it), cycled for `steps` steps, rather than 2000 steps on fresh
  synthetic multi-passkey samples (10 passkeys in BookSum text, 1K-32K tokens, the questions
  and passkeys supervised): the atlas ranks heads on one detection grid for every method;
- streaming heads keep `sink` 4 + `window` 128 keys (the atlas's KV policy), not 128 + 256:
  the gates are trained against the cache policy the atlas then evaluates, and at 1-2K tokens
  a 384-key window would cover a third of the context;
- float32 rather than bfloat16, and the final hidden state is the normalised residual
  (`ln_final.hook_normalized`: the norm-folded model's weight sits in the unembedding);
- the mixing is done on the attention pattern (`hook_pattern`), which is exact because a
  head's output is linear in it; DuoAttention mixes the two attention outputs. Backward keeps
  every layer's patterns: memory grows with the square of the context.

Every query head gets its KV head's gate; the same map for every trial (one training serves
all). Each step costs a forward pass with gradients and a backward pass at the trial's length."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rh_lens.detection.trace import TracedTrial
from rh_lens.errors import InputError
from rh_lens.model.headwise import KVPolicy


@dataclass(frozen=True)
class GateTraining:
    """`lr`, `l1`: those of DuoAttention's published runs (`--lr 0.02`, `--reg_weight 0.05`);
    `sink`, `window`: the streaming heads' keys (the atlas's KV policy by default, not
    DuoAttention's 128 + 256); `max_tokens`: longer samples are left out (memory: SmolLM2-135M
    took 7.8 GB at 1,000 tokens and over 17 GB at 2,000)."""

    steps: int = 150
    max_tokens: int = 1100
    # mit-han-lab/duo-attention scripts/run_train.sh L1-L9 @ fe93c31: every published run passes
    # lr 0.02 and reg 0.05 to scripts/train.sh (L22 --lr, L23 --reg_weight), as its
    # attn_patterns/*/config.json record ("lr": 0.02); duo_attn/utils.py L28's default 1e-1 is unused
    lr: float = 0.02
    l1: float = 0.05  # duo_attn/utils.py L42 (--reg_weight 0.05) @ fe93c31
    sink: int = 4
    window: int = 128
    seed: int = 0


def lr_factor(step: int, steps: int) -> float:
    """The learning rate's multiplier at `step` of `steps`: a linear ramp up over the first
    fifth and down over the last fifth, never under 0.1 and never over 1."""
    ramp = max(1, steps // 5)
    # mit-han-lab/duo-attention duo_attn/train.py L346-L353 @ fe93c31 (min(1, ...) caps it at lr)
    return min(1.0, max((step + 1) / ramp, 0.1), max((steps - step) / ramp, 0.1))


def _final_hidden(
    model: HookedTransformer, ids: list[int], gates: Tensor | None, policy: KVPolicy
) -> Float[Tensor, "pos d_model"]:
    """The normalised final residual of `ids` (the last residual where the model has no final
    norm); with `gates`, every head's pattern mixed with its streaming pattern by its KV head's gate."""
    captured: dict[str, Tensor] = {}
    final = (
        "ln_final.hook_normalized"
        if "ln_final.hook_normalized" in model.hook_dict
        else f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    )
    hooks = [(final, lambda x, hook: captured.__setitem__("hidden", x))]
    if gates is not None:
        positions = torch.arange(len(ids), device=model.cfg.device)
        streaming = policy.keeps(positions[None, :], positions[:, None])  # [query, key]

        def keep_scores(scores: Float[Tensor, "batch head query key"], hook) -> None:
            captured[hook.name] = scores

        def mix(pattern: Float[Tensor, "batch head query key"], hook) -> Float[Tensor, "batch head query key"]:
            scores = captured.pop(hook.name.replace("hook_pattern", "hook_attn_scores"))
            streamed = scores.masked_fill(~streaming, float("-inf")).softmax(dim=-1)
            # clamped where it mixes, as mit-han-lab/duo-attention duo_attn/patch/llama.py L120-L129 @ fe93c31
            gate = gates[hook.layer()].clamp(0, 1).repeat_interleave(policy.group)[None, :, None, None]
            return gate * pattern + (1 - gate) * streamed

        hooks += [
            (lambda name: name.endswith("attn.hook_attn_scores"), keep_scores),
            (lambda name: name.endswith("attn.hook_pattern"), mix),
        ]
    model.run_with_hooks(torch.tensor([ids], device=model.cfg.device), return_type=None, fwd_hooks=hooks)
    return captured["hidden"][0]


def learned_gates(
    model: HookedTransformer,
    samples: Sequence[tuple[list[int], int]],
    training: GateTraining = GateTraining(),
    progress: bool = True,
) -> Float[Tensor, "layer kv_head"]:
    """Train one gate per KV head on `samples`: (token ids, first supervised position), the
    positions from there to the end being those whose hidden states must stay the full model's."""
    if any(not 0 <= start < len(ids) for ids, start in samples):
        raise InputError("gate training needs samples whose supervised positions lie inside them")
    samples = [s for s in samples if len(s[0]) <= training.max_tokens]
    if not samples:
        raise InputError(f"no sample of at most {training.max_tokens} tokens to train the gates on (GateTraining.max_tokens)")
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    policy = KVPolicy("streaming", cfg.n_layers, cfg.n_heads, n_kv, frozenset(), training.sink, training.window)
    with torch.no_grad():
        targets = [_final_hidden(model, ids, None, policy)[start:].float() for ids, start in samples]
    # initial value 1: mit-han-lab/duo-attention duo_attn/utils.py L43 (--initial_value 1.0) @ fe93c31
    gates = torch.ones(cfg.n_layers, n_kv, device=cfg.device, requires_grad=True)
    optimizer = torch.optim.AdamW([gates], lr=training.lr, weight_decay=0)  # duo_attn/train.py L344 @ fe93c31
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, training.steps))
    order = list(range(len(samples)))
    random.Random(training.seed).shuffle(order)
    frozen = [p.requires_grad_(False) for p in model.parameters() if p.requires_grad]
    try:
        for step in tqdm(range(training.steps), desc="gates", unit="step", disable=not progress):
            with torch.no_grad():  # before every step: mit-han-lab/duo-attention duo_attn/train.py L98-L102 @ fe93c31
                gates.clamp_(0, 1)
            i = order[step % len(order)]
            ids, start = samples[i]
            hidden = _final_hidden(model, ids, gates, policy)[start:].float()
            # distillation (duo_attn/train.py L139-L146) + reg_weight x l1_loss, the mean |gate|
            # (duo_attn/loss.py L1-L4, train.py L154-L156) @ fe93c31
            loss = (hidden - targets[i]).pow(2).mean(dim=-1).mean() + training.l1 * gates.abs().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return gates.detach().clamp(0, 1)  # as DuoAttention reads its gates back: duo_attn/patch/__init__.py L119 @ fe93c31


def trial_scores(
    model: HookedTransformer, traced: Sequence[TracedTrial], training: GateTraining = GateTraining()
) -> Float[Tensor, "trial layer head"]:
    """The gates learned on the traced trials, every query head given its KV head's, the same
    map for every trial. A trial's sample: its prompt and the first tokens the model answered
    with (as many as the answer span has, as HeadKV reads an answer), supervising the
    positions that predict them."""
    samples = []
    for t in traced:
        start, end = t.trial.answer_span
        answer = list(t.generation.tokens[: end - start])
        if answer:  # the positions from the prompt's last token predict the answer's tokens
            samples.append((list(t.trial.prompt_ids) + answer[:-1], len(t.trial.prompt_ids) - 1))
    with torch.enable_grad():
        gates = learned_gates(model, samples, training)
    group = model.cfg.n_heads // gates.shape[1]
    return gates.repeat_interleave(group, dim=1).cpu().expand(len(traced), -1, -1)
