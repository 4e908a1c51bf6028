"""Long prompts: memory stays linear in the context, and sliding windows are respected.

No [query, key] tensor may have both dimensions longer than the prefill chunk: attention is
computed chunk by chunk ([head, chunk, context]) and decoding reads one row ([head, 1,
context]). A synthetic model with a long context checks every hooked score and pattern
tensor during detection, ablation and patching; a real Gemma-3 trial checks that no head
of a sliding-window layer ever attends (or is credited with a copy) outside its window.
"""

from __future__ import annotations

import pytest
import torch
from planted import NEEDLE, build_tokenizer, haystack_text
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens.detection.run import detect, run_trial
from rh_lens.execution.options import RunOptions
from rh_lens.interventions.masking import evaluate_niah
from rh_lens.interventions.patching import activation_patching, patching_pair
from rh_lens.model.generation import PREFILL_CHUNK, greedy_decode
from rh_lens.tasks.data import pydoc_haystack
from rh_lens.tasks.needles import BUILTIN_NEEDLES
from rh_lens.tasks.niah import build_trial, tokenize_haystack

CONTEXT = 3000  # tokens: six prefill chunks of 512, and 3000 x 3000 would be the quadratic tensor


@pytest.fixture(scope="module")
def long_model():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=64,
        d_head=16,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=96,
        d_vocab=len(tokenizer),
        n_ctx=4096,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        init_weights=True,
        device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    with torch.no_grad():
        model.unembed.W_U.mul_(20)  # random logits far apart
    return model.eval()


@pytest.fixture(scope="module")
def long_trial(long_model):
    haystack = tokenize_haystack(long_model.tokenizer, haystack_text(n_sentences=800), CONTEXT)
    return haystack, build_trial(long_model.tokenizer, haystack, NEEDLE, CONTEXT, 30, chat=False)


def watch_attention(model: HookedTransformer):
    """Record the shape of every attention score and pattern tensor computed."""
    shapes = []

    def record(act, hook):
        shapes.append((hook.name, tuple(act.shape)))

    names = lambda name: name.endswith(("attn.hook_attn_scores", "attn.hook_pattern"))  # noqa: E731
    return shapes, model.hooks(fwd_hooks=[(names, record)])


def assert_never_quadratic(shapes, chunk: int) -> None:
    assert shapes, "no attention was computed explicitly: nothing checked"
    quadratic = [(name, shape) for name, shape in shapes if shape[-2] > chunk and shape[-1] > chunk]
    assert not quadratic, quadratic[:3]


def test_detection_never_builds_a_quadratic_tensor(long_model, long_trial):
    _, trial = long_trial
    assert len(trial.prompt_ids) > CONTEXT - 200
    shapes, watching = watch_attention(long_model)
    with watching:
        detect(long_model, [trial], options=RunOptions(max_new_tokens=4, chunk_size=128, progress=False))
    assert_never_quadratic(shapes, 128)
    assert max(shape[-1] for _, shape in shapes) >= len(trial.prompt_ids) - 1  # the whole context was attended to


def test_ablation_never_builds_a_quadratic_tensor(long_model, long_trial):
    _, trial = long_trial
    shapes, watching = watch_attention(long_model)
    with watching:
        evaluate_niah(
            long_model, [trial], heads=[(0, 1), (1, 3)], method="uniform", options=RunOptions(max_new_tokens=4, progress=False)
        )
    assert_never_quadratic(shapes, PREFILL_CHUNK)


def test_patching_never_builds_a_quadratic_tensor(long_model, long_trial):
    haystack, _ = long_trial
    pair = patching_pair(long_model, NEEDLE, haystack, CONTEXT, 30, corrupted_answer="echo delta charlie bravo alpha", chat=False)
    shapes, watching = watch_attention(long_model)
    with watching:
        result = activation_patching(
            long_model, pair, kinds=("head_out", "pattern"), directions=("denoise",), min_gap=float("-inf"), progress=False
        )
    assert_never_quadratic(shapes, PREFILL_CHUNK)
    assert len(result.ranking("pattern")) == 8


@pytest.mark.slow
@torch.inference_mode()
def test_gemma3_sliding_layers_never_look_outside_their_window(real_model):
    """Gemma-3-270M: 5 of every 6 layers see the last 512 keys only. On a trial of more than
    twice the window with the needle near the start, every argmax of a sliding layer lies in
    its window, and no head of a sliding layer is credited with a copy."""
    model = real_model("gemma-3-270m")
    window = model.cfg.window_size
    haystack = tokenize_haystack(model.tokenizer, pydoc_haystack(), 2000)
    trial = build_trial(model.tokenizer, haystack, BUILTIN_NEEDLES[0], 2000, 10, max_tokens=model.cfg.n_ctx)
    n = len(trial.prompt_ids)
    assert n > 2 * window and trial.answer_span[1] < n - window  # the answer lies outside every window
    generation = greedy_decode(model, trial.prompt_ids, max_new_tokens=12)
    local = [layer for layer, kind in enumerate(model.cfg.attn_types) if kind == "local"]
    assert len(local) == 15
    for step, keys in enumerate(generation.argmax_keys):  # keys: [layer, head]
        query = n - 1 + step  # the position fed at this step
        assert (keys[local] > query - window).all() and (keys[local] <= query).all(), step
    record = run_trial(model, trial, max_new_tokens=12)
    assert all(record.head_scores[layer][head] == 0 for layer in local for head in range(model.cfg.n_heads))
    assert not any(int(name.split("-")[0]) in local for name in record.copied)
