"""Fine-tuning only chosen heads: the seed's proposal to adapt a model by retraining its
retrieval heads alone, with the two controls that make it a test.

- `head_masks(model, heads)` marks, in each attention parameter, the entries that belong to
  `heads`: each query head's slice of W_Q, b_Q and W_O, and the slice of W_K, b_K, W_V, b_V of
  the key-value head it reads. Under grouped-query attention that KV head is shared with the
  other query heads of its group, so training it changes what they read too.
- `HeadTraining(masks)`: only those entries train. Every other parameter is frozen and the
  gradient outside the masks is zeroed before each step; with no weight decay the optimiser
  never moves a frozen entry (tested: bit-identical).
- `LoRA(model, rank)`: the control of the same size, low-rank updates of the query and value
  projections of every layer (LoRA's default targets), added through TransformerLens hooks
  (`hook_q`, `hook_v`); `lora_rank_for(model, n)` picks the rank closest to n parameters.
  The third arm is as many entries in random heads (`rh_lens.interventions.masking.random_heads`).

`finetune(model, sequences, trainable, options)` trains on next-token loss over the answer
tokens of (prompt + answer + EOS) sequences (`answer_sequence`) and returns the losses, the
number of trained entries and the wall time as plain data (`FinetuneResult`).
`finetune_experiment` trains every arm from fresh weights and judges each on held-out trials
(recall, with intervals and paired tests as every other experiment) and on general text
(forgetting).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from rh_lens.detection.records import DetectionResult
from rh_lens.errors import InputError
from rh_lens.execution.files import read_json, write_atomic, write_json
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import run_directory
from rh_lens.heads import Head, check_heads, heads_by_layer
from rh_lens.interventions.base import Condition, InterventionResult, check_shape, evaluate
from rh_lens.interventions.masking import random_heads, ranking_and_excluded
from rh_lens.model.generation import PrefixCache, forward, prefix_order
from rh_lens.model.tl_internals import Hook, fused_attention, unembed_residual
from rh_lens.tasks.niah import Trial

# Attention parameters of a query head (indexed by query head) and of a key-value head
# (indexed by KV head: TransformerLens names them with a leading underscore under GQA).
QUERY_PARAMETERS = ("W_Q", "b_Q", "W_O")
KV_PARAMETERS = ("W_K", "b_K", "W_V", "b_V", "_W_K", "_b_K", "_W_V", "_b_V")


def head_masks(model: HookedTransformer, heads: Iterable[Head]) -> dict[str, Bool[Tensor, ...]]:
    """Parameter name -> which of its entries belong to `heads` (see the module docstring);
    only the attention parameters of the layers `heads` are in."""
    heads = list(heads)
    check_heads(heads, model.cfg.n_layers, model.cfg.n_heads)
    per_kv = model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads)
    params = dict(model.named_parameters())
    masks = {}
    for layer, idx in heads_by_layer(heads).items():
        for name in (*QUERY_PARAMETERS, *KV_PARAMETERS):
            full = f"blocks.{layer}.attn.{name}"
            if full not in params:
                continue
            mask = torch.zeros_like(params[full], dtype=torch.bool)
            rows = idx if name in QUERY_PARAMETERS else sorted({h // per_kv for h in idx})
            mask[rows] = True
            masks[full] = mask
    return masks


def parameter_count(masks: dict[str, Tensor]) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


class HeadTraining:
    """Trains the entries `masks` marks and nothing else (see the module docstring)."""

    def __init__(self, model: HookedTransformer, masks: dict[str, Bool[Tensor, ...]]):
        self.model, self.masks = model, masks
        self.params = [p for n, p in model.named_parameters() if n in masks]

    def n_parameters(self) -> int:
        return parameter_count(self.masks)

    @contextmanager
    def active(self):
        """Freeze every parameter but the masked ones; their gradients are masked as they arrive."""
        named = dict(self.model.named_parameters())
        before = {n: p.requires_grad for n, p in named.items()}
        handles = []
        for name, p in named.items():
            p.requires_grad_(name in self.masks)
            if name in self.masks:
                mask = self.masks[name]
                handles.append(p.register_hook(lambda grad, mask=mask: grad * mask))
        try:
            yield self.params
        finally:
            for h in handles:
                h.remove()
            for name, p in named.items():
                p.requires_grad_(before[name])


class LoRA:
    """Low-rank updates of the query and value projections of every layer, as TransformerLens
    hooks: q += (x A_q) B_q and v += (x A_v) B_v, x the attention's normalised input, B = 0 at
    the start (the model is unchanged until it trains)."""

    def __init__(self, model: HookedTransformer, rank: int, seed: int = 0):
        if rank < 1:
            raise InputError(f"LoRA rank {rank}: must be at least 1")
        cfg = model.cfg
        generator = torch.Generator().manual_seed(seed)
        n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.model, self.rank = model, rank
        self.shapes = {"q": (cfg.n_heads, cfg.d_head), "v": (n_kv, cfg.d_head)}
        self.params: list[Tensor] = []
        self.adapters: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}
        for layer in range(cfg.n_layers):
            for kind, (n, d) in self.shapes.items():
                a = (torch.randn(cfg.d_model, rank, generator=generator) / math.sqrt(cfg.d_model)).to(cfg.device)
                b = torch.zeros(rank, n * d, device=cfg.device)
                a.requires_grad_(True)
                b.requires_grad_(True)
                self.adapters[layer, kind] = (a, b)
                self.params += [a, b]
        self._inputs: dict[int, Tensor] = {}

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.params)

    def hooks(self) -> list[Hook]:
        def keep(x: Float[Tensor, "batch pos d_model"], hook, layer: int) -> None:
            self._inputs[layer] = x

        def add(act: Float[Tensor, "batch pos head d_head"], hook, layer: int, kind: str) -> Tensor:
            a, b = self.adapters[layer, kind]
            delta = (self._inputs[layer] @ a @ b).view(*act.shape[:2], *self.shapes[kind])
            return act + delta.to(act.dtype)

        hooks = []
        for layer in range(self.model.cfg.n_layers):
            # the attention's input: after its norm where there is one
            source = f"blocks.{layer}.ln1.hook_normalized"
            source = source if source in self.model.hook_dict else f"blocks.{layer}.hook_resid_pre"
            hooks.append((source, lambda x, hook, layer=layer: keep(x, hook, layer)))
            for kind in self.shapes:
                hooks.append(
                    (f"blocks.{layer}.attn.hook_{kind}", lambda x, hook, layer=layer, kind=kind: add(x, hook, layer, kind))
                )
        return hooks

    @contextmanager
    def active(self):
        """Freeze the model; the adapters are what trains (and act in every forward pass inside)."""
        before = {n: p.requires_grad for n, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        try:
            with self.model.hooks(fwd_hooks=self.hooks()):
                yield self.params
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(before[n])


def lora_rank_for(model: HookedTransformer, n_parameters: int) -> int:
    """The LoRA rank whose adapters hold closest to `n_parameters` entries (at least 1)."""
    cfg = model.cfg
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    per_rank = cfg.n_layers * (2 * cfg.d_model + cfg.n_heads * cfg.d_head + n_kv * cfg.d_head)
    return max(1, round(n_parameters / per_rank))


def answer_sequence(tokenizer, trial: Trial) -> tuple[Int[Tensor, " pos"], Bool[Tensor, " pos"]]:
    """The trial's prompt followed by its answer and EOS, and which positions hold answer
    tokens (the ones the loss reads)."""
    answer = list(tokenizer(" " + trial.needle.real_needle.strip(), add_special_tokens=False)["input_ids"])
    answer.append(tokenizer.eos_token_id)
    ids = torch.tensor([*trial.prompt_ids, *answer])
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[len(trial.prompt_ids) :] = True
    return ids, mask


def _sequence_loss(
    model: HookedTransformer, ids: Int[Tensor, " pos"], mask: Bool[Tensor, " pos"], start: int = 0, cache=None
) -> Tensor:
    """Next-token loss over the answer tokens (`mask`) of one sequence, from position `start`
    on (`cache` holds the key-value cache of ids[:start]). Only the positions that predict an
    answer token are unembedded: at every position the projection onto the vocabulary would
    be about a fifth of SmolLM2's forward-pass arithmetic at 1000 tokens."""
    ids, mask = ids.to(model.cfg.device), mask.to(model.cfg.device)
    tokens = ids[None, start:-1]  # the last token predicts nothing
    if cache is None:
        residual = model(tokens, stop_at_layer=model.cfg.n_layers)  # [1, pos, d_model]: after the last block
    else:
        residual = forward(model, tokens, cache, stop_at_layer=model.cfg.n_layers)
    predicting = mask[start + 1 :]
    logits = unembed_residual(model, residual[:, predicting])[0]
    return torch.nn.functional.cross_entropy(logits, ids[start + 1 :][predicting])


@torch.no_grad()
def answer_loss(model: HookedTransformer, sequences: Sequence[tuple[Tensor, Tensor]], progress: bool = False) -> float:
    """Mean next-token loss over the answer tokens of `sequences` (`progress`: a bar over
    them). They are taken in prefix order, and each is prefilled up to its answer from the
    cache of the one before (`PrefixCache`): held-out trials of one haystack share most of
    their prompt, so most of it is computed once."""
    starts = [_answer_start(mask) for _, mask in sequences]
    order = prefix_order([ids[:start].tolist() for (ids, _), start in zip(sequences, starts, strict=True)])
    prefixes = PrefixCache(model)
    losses = []
    with fused_attention(model):  # the prefix cache's keys are rotated: continue it on the same path
        for i in tqdm(order, "answer loss", disable=not progress):
            (ids, mask), start = sequences[i], starts[i]
            losses.append(_sequence_loss(model, ids, mask, start, prefixes.prefill(ids[:start])).item())
    return float(sum(losses) / len(sequences))


def _answer_start(mask: Bool[Tensor, " pos"]) -> int:
    """The position that predicts a sequence's first answer token."""
    answer = mask.nonzero()
    if len(answer) == 0 or int(answer[0]) < 2:
        raise InputError("a sequence needs a prompt of at least two tokens before its answer tokens")
    return int(answer[0]) - 1


@dataclass(frozen=True, kw_only=True)
class FinetuneOptions:
    """`steps` optimiser steps of `batch_size` sequences each (drawn with `seed`), AdamW at
    learning rate `lr` with no weight decay (decay would move frozen entries), gradients
    clipped at norm 1."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise InputError(f"steps {self.steps}, batch size {self.batch_size}, lr {self.lr}: need >= 1, >= 1, > 0")


@dataclass
class FinetuneResult:
    """What a fine-tuning run did: the arm's name, the trained entries, the loss on answer
    tokens at each step and the wall time."""

    arm: str
    n_parameters: int
    losses: list[float]
    seconds: float
    options: dict

    def to_json(self) -> dict:
        return asdict(self)


CHECKPOINT_EVERY = 10  # training steps between checkpoints


def finetune(
    model: HookedTransformer,
    sequences: Sequence[tuple[Tensor, Tensor]],
    trainable: HeadTraining | LoRA,
    options: FinetuneOptions = FinetuneOptions(),
    arm: str = "heads",
    progress: bool = False,
    checkpoint: str | Path | None = None,
) -> FinetuneResult:
    """Train `trainable` (only it) on the answer tokens of `sequences` (`answer_sequence`);
    `progress`: a bar over the steps with the last step's loss. With `checkpoint` (a file),
    the trained tensors, the optimiser's state, the losses and the batch sampler's state are
    saved there every CHECKPOINT_EVERY steps, and a run that finds the file goes on from it:
    a killed run loses at most those steps, and its result is that of an unbroken run."""
    if not sequences:
        raise InputError("no training sequences")
    order = random.Random(options.seed)
    losses, seconds, first = [], 0.0, 0
    with trainable.active() as params:
        optimizer = torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)
        if checkpoint is not None and Path(checkpoint).exists():
            first, losses, seconds = _load_checkpoint(checkpoint, arm, options, params, optimizer, order)
        started = time.perf_counter() - seconds
        bar = tqdm(range(options.steps), desc=f"train {arm}", unit="step", disable=not progress, initial=first)
        for step in range(first, options.steps):
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for ids, mask in order.choices(sequences, k=options.batch_size):
                loss = _sequence_loss(model, ids, mask)
                (loss / options.batch_size).backward()
                total += loss.item() / options.batch_size
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(total)
            bar.update()
            bar.set_postfix(loss=f"{total:.3f}")
            if checkpoint is not None and ((step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == options.steps):
                state = {"arm": arm, "options": asdict(options), "step": step + 1, "losses": losses}
                state |= {"seconds": time.perf_counter() - started, "order": order.getstate()}
                state |= {"params": [p.detach() for p in params], "optimizer": optimizer.state_dict()}
                write_atomic(checkpoint, lambda f, state=state: torch.save(state, f), mode="wb")
        bar.close()
    return FinetuneResult(arm, trainable.n_parameters(), losses, time.perf_counter() - started, asdict(options))


def _load_checkpoint(path, arm: str, options: FinetuneOptions, params, optimizer, order: random.Random):
    """Restore a `finetune` checkpoint into `params`, `optimizer` and `order`; (steps done,
    losses, seconds trained)."""
    state = torch.load(path, weights_only=False)
    if state["arm"] != arm or state["options"] != asdict(options) or len(state["params"]) != len(params):
        raise InputError(f"{path} is a checkpoint of another training run ({state['arm']}, {state['options']}): remove it")
    with torch.no_grad():
        for p, saved in zip(params, state["params"], strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    order.setstate(state["order"])
    return state["step"], state["losses"], state["seconds"]


# --- the experiment: retrieval heads vs random heads vs LoRA, judged on held-out trials ----


@dataclass(frozen=True, kw_only=True)
class FinetuneArms:
    """Which arms a fine-tuning experiment trains, each from the same starting weights: the
    top `k` heads of a ranking, `k` random heads (outside the top list and every head above
    the threshold, as for masking) for each of `seeds`, and with `lora` LoRA at the top heads'
    parameter count; `training`: how each arm trains."""

    k: int = 5
    seeds: tuple[int, ...] = (0,)
    lora: bool = True
    training: FinetuneOptions = FinetuneOptions()

    def __post_init__(self):
        if self.k < 1:
            raise InputError(f"K {self.k}: must be at least 1")
        object.__setattr__(self, "seeds", tuple(self.seeds))

    def settings(self) -> dict:
        return {"k": self.k, "seeds": list(self.seeds), "lora": self.lora, "training": asdict(self.training)}


class FinetuneExperimentResult(InterventionResult):
    """Held-out records after each arm trained (conditions "none": no training, "top-K",
    "random-K-seedS" grouped as "random-K", "lora"), with each arm's `FinetuneResult` and its
    held-out answer loss and general-text loss in the metadata."""

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """The retrieval heads' arm against random heads and LoRA, then every arm against no training."""
        groups = self.groups()
        top = next((g for g in groups if g.startswith("top-")), None)
        pairs = [(top, other) for other in groups if top is not None and other not in (top, "none")]
        return pairs + super().comparison_pairs()


def finetune_experiment(
    load: Callable[[], HookedTransformer],
    detection: DetectionResult,
    train: Sequence[Trial],
    evaluation: Sequence[Trial],
    general_text: Int[Tensor, " pos"],
    arms: FinetuneArms = FinetuneArms(),
    *,
    out_dir: str | Path | None = None,
    options: RunOptions = RunOptions(),
) -> FinetuneExperimentResult:
    """Train each arm of `arms` from a fresh model (`load()`) on the answers of `train`, then
    answer `evaluation` (held out: other needles or questions) and measure the loss on
    `general_text` (forgetting). An arm whose evaluation finished is not trained again on resume."""
    model = load()
    check_shape("scores", detection.n_layers, detection.n_heads, model)
    ranking, outside = ranking_and_excluded(detection, arms.k)
    plan: list[tuple[str, str, list[Head] | None, dict]] = [("none", "none", None, {"kind": "none"})]
    plan.append((f"top-{arms.k}", f"top-{arms.k}", ranking[: arms.k], {"kind": "top", "k": arms.k}))
    for seed in arms.seeds:
        heads = random_heads(detection.n_layers, detection.n_heads, arms.k, outside, seed)
        plan.append((f"random-{arms.k}-seed{seed}", f"random-{arms.k}", heads, {"kind": "random", "k": arms.k, "seed": seed}))
    if arms.lora:
        plan.append(("lora", "lora", None, {"kind": "lora"}))
    settings = arms.settings() | {"train": [t.key for t in train]}
    n_top = parameter_count(head_masks(model, ranking[: arms.k]))
    conditions = []
    with run_directory(out_dir, options.resume, options.overwrite) if out_dir is not None else nullcontext():
        for name, group, heads, metadata in plan:
            where = Path(out_dir) / "conditions" / name if out_dir is not None else None
            if where is not None and options.resume and (where / "arm.json").exists():  # trained and judged: read back
                metadata = read_json(where / "arm.json")
                records = evaluate(model, evaluation, None, out_dir=where, options=options, settings=settings, desc=name)
            else:
                arm = load() if name != "none" else model
                trainable = _arm(arm, name, heads, n_top, arms.training.seed)
                sequences = [answer_sequence(arm.tokenizer, t) for t in train]
                checkpoint = Path(out_dir) / "training" / f"{name}.pt" if out_dir is not None else None
                trained = (
                    finetune(arm, sequences, trainable, arms.training, name, options.progress, checkpoint)
                    if trainable is not None
                    else None
                )
                with trainable.active() if isinstance(trainable, LoRA) else nullcontext():
                    records = evaluate(arm, evaluation, None, out_dir=where, options=options, settings=settings, desc=name)
                    metadata = {
                        **metadata,
                        "heads": [str(h) for h in heads or ()],
                        "training": trained.to_json() if trained else None,
                        "heldout_answer_loss": answer_loss(
                            arm, [answer_sequence(arm.tokenizer, t) for t in evaluation], options.progress
                        ),
                        "general_text_loss": text_loss(arm, general_text),
                    }
                if where is not None:
                    write_json(where / "arm.json", metadata)
                    checkpoint.unlink(missing_ok=True)  # the arm is judged: its training is no longer needed
            conditions.append(Condition(name, None, group, metadata, records))
        result = FinetuneExperimentResult("finetune", model.cfg.model_name, conditions, settings)
        if out_dir is not None:
            write_json(Path(out_dir) / "finetune.json", result.to_json())
    return result


def _arm(model: HookedTransformer, name: str, heads: list[Head] | None, n_top: int, seed: int) -> HeadTraining | LoRA | None:
    """What an arm trains: the heads' entries, LoRA adapters of the top heads' size, or nothing."""
    if heads is not None:
        return HeadTraining(model, head_masks(model, heads))
    return LoRA(model, lora_rank_for(model, n_top), seed=seed) if name == "lora" else None


@torch.no_grad()
def text_loss(model: HookedTransformer, tokens: Int[Tensor, " pos"]) -> float:
    """Mean next-token loss over `tokens` (general text: what a model forgets shows here)."""
    tokens = tokens.to(model.cfg.device)[None, : model.cfg.n_ctx]
    return float(model(tokens, return_type="loss"))
