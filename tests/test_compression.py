"""KV-cache compression: the mask, the byte account, the rankings, and NIAH on the planted
model, where the planted head alone must keep the whole cache."""

from __future__ import annotations

import json

import pytest
import torch
from planted import DECOY, NEEDLE, PLANTED, build_planted_model, build_tokenizer, haystack_text
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens.detection.probes import razor_scores
from rh_lens.detection.run import detect
from rh_lens.execution.options import RunOptions
from rh_lens.interventions.compression import (
    CompressionOptions,
    KVPolicy,
    compression_experiment,
    compression_hooks,
    export_duo_attention,
    kv_bytes,
    kv_head_scores,
    rank_kv_heads,
    retrieval_policy,
    streaming_policy,
)
from rh_lens.model.generation import Decoding
from rh_lens.tasks.niah import build_trial, tokenize_haystack

planted = build_planted_model()
haystack = tokenize_haystack(planted.tokenizer, haystack_text(), 300)
far = [build_trial(planted.tokenizer, haystack, NEEDLE, 300, depth) for depth in (0, 25, 50)]  # needle >= 60 tokens back


def gqa_model() -> HookedTransformer:
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
        n_ctx=256,
        act_fn="silu",
        normalization_type="RMS",
        positional_embedding_type="rotary",
        init_weights=True,
        device="cpu",
    )
    return HookedTransformer(cfg, tokenizer=tokenizer).eval()


@torch.inference_mode()
def test_streaming_heads_see_only_sink_and_window_and_full_heads_are_untouched():
    model = gqa_model()
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 60), generator=torch.Generator().manual_seed(1))
    policy = KVPolicy("test", 2, 4, 2, frozenset({(0, 1), (1, 0)}), sink=3, window=5)
    _, clean = model.run_with_cache(tokens)
    with model.hooks(fwd_hooks=compression_hooks(policy)):
        _, compressed = model.run_with_cache(tokens)
    q, k = torch.arange(60)[:, None], torch.arange(60)[None]
    allowed = (k <= q) & ((k < 3) | (k > q - 5))
    for layer in range(2):
        pattern = compressed[f"blocks.{layer}.attn.hook_pattern"][0]
        for head in range(4):
            streaming = (layer, head // 2) not in policy.full  # query heads 0-1 read KV head 0, 2-3 KV head 1
            assert (pattern[head][~allowed] == 0).all() if streaming else True
            assert streaming == (head in policy.streaming_heads(layer))
    # Layer 0's full heads are exactly as without the policy (later layers see changed inputs).
    torch.testing.assert_close(compressed["blocks.0.attn.hook_pattern"][0, 2:], clean["blocks.0.attn.hook_pattern"][0, 2:])
    every_head_full = KVPolicy("all", 2, 4, 2, frozenset((l, h) for l in range(2) for h in range(2)))
    assert compression_hooks(every_head_full) == []  # nothing to mask: logits identical


def test_byte_account_by_hand_with_grouped_query_attention():
    policy = KVPolicy("test", n_layers=2, n_heads=4, n_kv_heads=2, full=frozenset({(0, 1)}), sink=4, window=8)
    kept, full = kv_bytes(policy, tokens=100, d_head=16, dtype_bytes=2)
    # 1 full KV head x 100 tokens + 3 streaming KV heads x (4 + 8) tokens, each x 2 (K, V) x 16 x 2 bytes
    assert (kept, full) == ((100 + 3 * 12) * 2 * 16 * 2, 4 * 100 * 2 * 16 * 2)
    assert kv_bytes(policy, tokens=10, d_head=16, dtype_bytes=2)[0] == kv_bytes(policy, 10, 16, 2)[1]  # short: nothing dropped


def test_streaming_llm_keeps_the_bytes_of_the_policy_it_matches():
    model = gqa_model()
    detection = detect(planted, far[:1], options=RunOptions(max_new_tokens=2, progress=False))
    detection.n_layers, detection.n_heads = 2, 4
    policy = retrieval_policy(model, detection, 0.5, sink=4, window=8)
    stream = streaming_policy(model, 0.5, sink=4, window=8)
    assert len(policy.full) == 2 and stream.full == frozenset()
    for tokens in (8, 100, 1000, 4096):
        a, b = kv_bytes(policy, tokens, 16, 2)[0], kv_bytes(stream, tokens, 16, 2)[0]
        assert abs(a - b) <= 4 * 2 * 16 * 2  # within one token per KV head (whole tokens)


def test_kv_heads_rank_by_their_best_query_head():
    scores = torch.tensor([[0.1, 0.9, 0.0, 0.2], [0.3, 0.3, 0.5, 0.0]])  # 2 layers x 4 query heads, 2 per KV head
    torch.testing.assert_close(kv_head_scores(scores, 2), torch.tensor([[0.9, 0.2], [0.3, 0.5]]))
    assert rank_kv_heads(kv_head_scores(scores, 2)) == [(0, 0), (1, 1), (1, 0), (0, 1)]


def test_razor_finds_the_induction_and_echo_heads_of_the_planted_model():
    scores = razor_scores(planted, length=30)  # distinct tokens of the planted vocabulary
    top = {(l, h) for l, h in torch.stack(torch.where(scores > 0.5), dim=1).tolist()}
    assert tuple(PLANTED) in top and tuple(DECOY) in top  # induction head; duplicate-token (echo) head


# Trials of different lengths, so that decoded together (batch_size 4) their rows are padded:
# a policy that counted sink and window from the padded row's first key would keep the wrong keys.
ragged = far + [build_trial(planted.tokenizer, haystack, NEEDLE, 270, 10)]


@pytest.mark.parametrize("cache", ["masked", "real"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("decode_only", [False, True])
def test_the_planted_head_alone_needs_the_full_cache(decode_only, batch_size, cache):
    keep_planted = KVPolicy("planted", 2, 4, 4, frozenset({PLANTED}), sink=4, window=8)
    drop_planted = KVPolicy(
        "others", 2, 4, 4, frozenset(h for h in [(l, k) for l in range(2) for k in range(4)] if h != PLANTED), 4, 8
    )
    from rh_lens.interventions.base import answer_under
    from rh_lens.interventions.compression import KVCompression

    assert len({len(t.prompt_ids) for t in ragged}) > 1
    decoding = Decoding(max_new_tokens=8, batch_size=batch_size)
    kept = dict(answer_under(KVCompression(keep_planted, decode_only, cache), decoding, planted, ragged))
    dropped = dict(answer_under(KVCompression(drop_planted, decode_only, cache), decoding, planted, ragged))
    for i, trial in enumerate(ragged):
        assert trial.answer_span[1] < len(trial.prompt_ids) - 8 - 8  # the answer is outside every window
        assert kept[i].rouge_recall == 1.0, kept[i].response
        assert dropped[i].rouge_recall < 0.5, dropped[i].response


def test_compression_experiment_and_duo_attention_export(tmp_path):
    from rh_lens.app.reports import format_compression, save_compression

    detection = detect(planted, far, options=RunOptions(max_new_tokens=8, progress=False))
    result = compression_experiment(
        planted,
        far,
        detection,
        CompressionOptions(fractions=(0.125,), sink=4, window=8, seeds=(0, 1)),
        out_dir=tmp_path / "run",
        options=RunOptions(max_new_tokens=8, progress=False),
    )
    rows = {(r["method"], r["full_fraction"]): r for r in result.summary()}
    assert rows[("full", 1.0)]["mean_recall"] == 1.0 and rows[("full", 1.0)]["kv_kept"] == 1.0
    assert rows[("retrieval", 0.125)]["mean_recall"] == 1.0  # one of 8 heads full: the planted one
    assert rows[("streaming", 0.125)]["mean_recall"] < 0.5  # the same bytes spread over every head
    assert rows[("retrieval", 0.125)]["kv_kept"] == pytest.approx(rows[("streaming", 0.125)]["kv_kept"], abs=0.02)
    assert 0.1 < rows[("retrieval", 0.125)]["kv_kept"] < 0.25
    assert "retrieval" in format_compression(result)
    written = save_compression(result, tmp_path / "run")
    tsv = (tmp_path / "run" / "duo_attention" / "0.125" / "full_attention_heads.tsv").read_text().splitlines()
    assert tsv == ["0\t0\t0\t0", "0\t0\t1\t0"]  # layer rows, KV-head columns: only 1-2 full
    assert json.loads((tmp_path / "run" / "duo_attention" / "0.125" / "config.json").read_text()) == {
        "sink_size": 4,
        "recent_size": 8,
    }
    assert all(p.exists() for p in written)
    again = compression_experiment(
        planted,
        far,
        detection,
        CompressionOptions(fractions=(0.125,), sink=4, window=8, seeds=(0, 1)),
        out_dir=tmp_path / "run",
        options=RunOptions(max_new_tokens=8, resume=True, progress=False),
    )
    assert again.summary() == result.summary()


@pytest.mark.parametrize("decode_only", [False, True])
def test_the_real_cache_gives_the_simulations_records_in_every_condition(tmp_path, decode_only):
    """Every condition of the experiment (retrieval, random, StreamingLLM's growing window,
    RazorAttention), every trial: the same generated ids through the head-wise cache."""
    detection = detect(planted, far, options=RunOptions(max_new_tokens=8, progress=False))
    runs = {
        cache: compression_experiment(
            planted,
            ragged,
            detection,
            CompressionOptions(fractions=(0.125, 0.5), sink=4, window=8, seeds=(0,), decode_only=decode_only, cache=cache),
            options=RunOptions(max_new_tokens=8, progress=False),
        )
        for cache in ("masked", "real")
    }
    assert runs["real"].settings["cache"] == "real"
    masked, real = ({c.name: c for c in runs[k].conditions} for k in ("masked", "real"))
    assert masked.keys() == real.keys() and len(masked) == 9
    for name in masked:
        assert real[name].intervention is None or real[name].intervention.cache == "real"
        assert [r.generated_ids for r in real[name].records] == [r.generated_ids for r in masked[name].records], name
    assert len({tuple(r.generated_ids) for c in masked.values() for r in c.records}) > 1  # conditions differ


def test_export_of_a_grouped_query_split(tmp_path):
    policy = KVPolicy("test", 3, 8, 2, frozenset({(0, 1), (2, 0)}), sink=2, window=64)
    export_duo_attention(policy, tmp_path)
    assert (tmp_path / "full_attention_heads.tsv").read_text() == "0\t1\n0\t0\n1\t0\n"
