"""Head-finding methods: each on the planted model, on hand-computed cases, and the
decode-time trace and query-focused score against TransformerLens's own run_with_cache."""

import pytest
import torch
from planted import DECOY, NEEDLE, PLANTED, build_planted_model, haystack_text
from transformer_lens import HookedTransformer, HookedTransformerConfig

from rh_lens.detection.methods import (
    METHODS,
    attention_mass,
    copy_offsets,
    duo_gates,
    head_map,
    output,
    query_focused,
    razor,
    shifted_copy,
)
from rh_lens.detection.run import detect
from rh_lens.detection.trace import HeadTrace, TracedTrial, trace_trials
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.interventions.compression import KVCompression
from rh_lens.model.generation import Decoding, Generation, decode_prompts
from rh_lens.model.headwise import KVPolicy
from rh_lens.tasks.grading import Answer
from rh_lens.tasks.needles import Needle
from rh_lens.tasks.niah import Trial, build_trial, tokenize_haystack

QUIET = RunOptions(progress=False)


@pytest.fixture(scope="module")
def planted():
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, length, depth) for length in (260, 300) for depth in (20, 80)]
    return model, trials, trace_trials(model, trials, QUIET)


def _top(scores):
    return divmod(int(scores.flatten().argmax()), scores.size(1))


@pytest.mark.parametrize("name", ["retrieval", "attention-mass", "shifted-copy", "output"])
def test_the_planted_head_ranks_first(planted, name):
    model, _, traced = planted
    assert all(t.answer.success for t in traced)
    assert _top(head_map(name, model, traced).scores()) == PLANTED


@pytest.mark.parametrize("name", ["query-focused", "razor"])
def test_attention_only_methods_cannot_tell_the_planted_head_from_its_decoy(planted, name):
    # The decoy (a duplicate-token head) attends from each token to its earlier copy: from
    # the question's "secret" / "code" into the needle (query-focused) and, on a repeated
    # sequence, to the previous occurrence (RazorAttention's echo). Where a head looks is all
    # these methods see, so the decoy scores at least nearly as high as the planted head,
    # which alone writes the answer; both above every other head.
    model, _, traced = planted
    scores = head_map(name, model, traced).scores()
    others = [scores[layer, head] for layer in range(2) for head in range(4) if (layer, head) not in (PLANTED, DECOY)]
    assert scores[DECOY] >= 0.9 * scores[PLANTED] and min(scores[PLANTED], scores[DECOY]) > max(others)


def test_retrieval_from_the_trace_is_detects_score(planted):
    model, trials, traced = planted
    assert torch.equal(head_map("retrieval", model, traced).scores(), detect(model, trials, options=QUIET).scores())


def _hand_trial(tokens, argmax_keys, observed, span=(4, 7), prompt_ids=None, success=True):
    prompt_ids = prompt_ids or [9, 9, 9, 9, 1, 2, 3, 9, 9, 9]
    needle = Needle(needle="n", question="q", real_needle="a b c")
    trial = Trial(100, 50, needle, "hay", "p", prompt_ids, span, False)
    answer = Answer(
        key="t",
        context_length=100,
        depth=50,
        needle_id="n",
        haystack="hay",
        answer="a b c",
        generated_ids=tokens,
        response="",
        rouge_recall=1.0,
        success=success,
    )
    return TracedTrial(trial, answer, Generation(tokens, argmax_keys, None, observed))


def test_attention_mass_by_hand():
    # one layer, one head, span [4, 7) (k = 3), two steps; keys kept in weight order
    keys = torch.tensor([[4, 9, 5, 0], [6, 5, 1, 2]]).view(2, 1, 1, 4)
    weights = torch.tensor([[0.5, 0.2, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]]).view(2, 1, 1, 4)
    traced = _hand_trial([1, 2], None, {"top_keys": keys, "top_weights": weights})
    # step 1: keys 4 and 5 of the top 3 are inside: (0.5 + 0.2); step 2: 6 and 5: (0.4 + 0.3);
    # each weight / (k x N), N = 3 answer tokens (HeadKV's published scores, without their x 10)
    expected = (0.5 + 0.2 + 0.4 + 0.3) / (3 * 3)
    assert attention_mass.trial_score(traced).item() == pytest.approx(expected)


def test_attention_mass_is_headkvs_published_formula_on_a_hand_made_decoding():
    # HeadKV's retrieval_calculate as it computed the published head_score files
    # (FYYFU/HeadKV Important_Head/retrieval_head_detection_r2.py L217-L227 @ 84e4c2b), written
    # out: per step, its top-k keys (k = span length) and for each inside the span
    # 10 * v / (span * answer_tokens_num); decoding stops after answer_tokens_num tokens (L254)
    start, end = 4, 7
    rows = [  # one attention row per decode step, over 10 keys; the 4th step comes after the answer
        [0.0, 0.1, 0.0, 0.0, 0.5, 0.0, 0.2, 0.1, 0.1, 0.0],
        [0.1, 0.0, 0.0, 0.0, 0.0, 0.6, 0.0, 0.3, 0.0, 0.0],
        [0.0, 0.0, 0.3, 0.0, 0.1, 0.2, 0.4, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.0, 0.9, 0.1, 0.0, 0.0, 0.0, 0.0],
    ]
    answer_tokens_num = end - start
    headkv = 0.0
    for row in rows[:answer_tokens_num]:
        top = sorted(range(len(row)), key=lambda i: -row[i])[: end - start]
        headkv += sum(10 * row[i] / ((end - start) * answer_tokens_num) for i in top if start <= i < end)
    # by hand: step 1 keys 4 (0.5), 6 (0.2); step 2 key 5 (0.6); step 3 keys 6 (0.4), 5 (0.2)
    assert headkv == pytest.approx(10 * (0.5 + 0.2 + 0.6 + 0.4 + 0.2) / 9)
    weights, keys = torch.tensor(rows).topk(4, dim=-1)
    traced = _hand_trial([1, 2, 3, 9], None, {"top_keys": keys.view(4, 1, 1, 4), "top_weights": weights.view(4, 1, 1, 4)})
    assert attention_mass.trial_score(traced).item() == pytest.approx(headkv / 10)


def test_shifted_copy_credits_a_head_one_position_late():
    # head 0 looks at the copied token itself, head 1 one position after it, head 2 one before
    argmax = torch.tensor([[[4, 5, 3]], [[5, 6, 4]], [[6, 7, 5]]])  # [step, layer 1, head 3]
    traced = [_hand_trial([1, 2, 3], argmax, {})]
    offsets, shares = copy_offsets(traced, 1, 3)
    assert offsets.tolist() == [[0, 1, 0]] and shares.tolist() == [[1.0, 1.0, 0.0]]
    assert shifted_copy.trial_scores(_Cfg(1, 3), traced).tolist() == [[[1.0, 1.0, 0.0]]]
    assert METHODS["retrieval"](_Cfg(1, 3), traced).tolist() == [[[1.0, 0.0, 0.0]]]


def test_output_averages_the_steps_that_emit_answer_tokens():
    attribution = torch.tensor([2.0, 4.0, -1.0]).view(3, 1, 1)  # the last step emits a non-answer token
    traced = [_hand_trial([1, 3, 9], None, {"logit_attribution": attribution})]
    traced.append(_hand_trial([1], None, {"logit_attribution": torch.tensor([[[7.0]]])}, success=False))
    assert output.trial_scores(_Cfg(1, 1), traced).flatten().tolist() == [3.0, 7.0]
    assert head_map("output", _Cfg(1, 1), traced).scores().item() == pytest.approx(3.0)  # the failed trial left out


class _Cfg:
    def __init__(self, n_layers, n_heads):
        self.cfg = type("cfg", (), {"n_layers": n_layers, "n_heads": n_heads, "model_name": "hand"})


def _tiny(normalization: str) -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=32,
        n_ctx=64,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=64,
        d_vocab=40,
        act_fn="silu",
        normalization_type=normalization,
        positional_embedding_type="rotary",
        device="cpu",
    )
    model = HookedTransformer(cfg)
    for p in model.parameters():  # random weights, big enough that attention is not uniform
        torch.nn.init.normal_(p, std=0.3)
    # folding moves value biases (and the norms' biases folded into them) out of z into b_O:
    # leave none to move, so z and hence each head's output are the same in both models
    for name, p in model.named_parameters():
        if name.endswith("b_V") or (".ln" in name and name.endswith(".b")):
            p.data.zero_()
    return model


@pytest.mark.parametrize("normalization", ["RMS", "LN"])
def test_the_trace_is_transformer_lens_run_with_cache(normalization):
    model = _tiny(normalization)
    prompts = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (12, 17)]
    decoding = Decoding(max_new_tokens=6, batch_size=2)  # left padding: positions must come back as prompt positions
    generations = dict(decode_prompts(model, prompts, decoding, observers=[HeadTrace(model, top_k=3)]))
    folded = HookedTransformer(model.cfg)
    folded.load_state_dict(model.state_dict())
    folded.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)  # the norm into W_U
    for i, prompt in enumerate(prompts):
        g = generations[i]
        sequence = torch.tensor([prompt + g.tokens[:-1]])
        _, cache = folded.run_with_cache(sequence)
        heads = cache.stack_head_results(layer=-1)  # [layer * head, batch, pos, d_model]
        for step, token in enumerate(g.tokens):
            pos = len(prompt) - 1 + step
            expected = cache.logit_attrs(heads[:, :, pos], tokens=torch.tensor([token]), pos_slice=pos)
            got = g.observed["logit_attribution"][step].flatten()
            torch.testing.assert_close(got, expected[:, 0], rtol=1e-4, atol=1e-4)
            for layer in range(model.cfg.n_layers):
                row = cache["pattern", layer][0, :, pos]
                torch.testing.assert_close(g.observed["top_weights"][step, layer], row.topk(3).values, rtol=1e-4, atol=1e-5)
                assert torch.equal(g.observed["top_keys"][step, layer, :, 0], row.argmax(dim=-1))


def test_query_focused_is_a_direct_computation_from_run_with_cache(planted):
    model, trials, _ = planted
    trial = trials[0]
    ids = trial.prompt_ids

    def find(sub):
        return next(i for i in range(len(ids) - len(sub), -1, -1) if ids[i : i + len(sub)] == sub)

    encode = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    question, needle = encode(trial.needle.question), encode(trial.needle.needle)
    q_at, n_at = find(question), find(needle)
    null = ids[:q_at] + encode(query_focused.NULL_QUERY) + ids[q_at + len(question) :]

    def mass(tokens, rows):  # [layer, head, gold token]: attention from the query rows, averaged over them
        _, cache = model.run_with_cache(torch.tensor([tokens]))
        gold = range(n_at, n_at + len(needle))
        return torch.stack([cache["pattern", l][0][:, rows][..., gold].mean(-2) for l in range(model.cfg.n_layers)])

    calibrated = mass(ids, range(q_at, q_at + len(question))) - mass(null, range(q_at, q_at + len(encode("N/A"))))
    expected = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            values = calibrated[layer, head].tolist()
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            expected[layer, head] = sum(v for v in values if v > mean - 2 * std)  # QRHead's drop of low outliers
    torch.testing.assert_close(query_focused.trial_score(model, trial), expected)


def test_query_focused_drops_gold_tokens_under_mean_minus_two_std():
    # princeton-pli/QRHead attn_retriever.py L304-L311: per head, the document's calibrated token
    # scores not above mean - 2 std (Bessel) are dropped, the rest summed
    calibrated = torch.tensor(
        [
            [1.0] * 9 + [-5.0],  # mean 0.4, std 1.897: threshold -3.39 drops the -5
            [0.5] * 10,  # constant: nothing is above mean - 0, QRHead's strict > drops all
            [float(i) for i in range(1, 11)],  # no outlier: the plain sum
        ]
    ).view(1, 3, 10)
    assert query_focused.calibrated_sum(calibrated).flatten().tolist() == pytest.approx([9.0, 0.0, 55.0])
    assert query_focused.calibrated_sum(torch.tensor([[[-2.0]]])).item() == -2.0  # one gold token is kept


def test_patching_ranks_the_planted_head_first_and_leaves_out_trials_it_cannot_pair(planted, monkeypatch):
    import rh_lens.interventions.patching as patching
    from rh_lens.detection.methods.base import head_map as method_map

    model, trials, traced = planted
    # the planted needle has no built-in corrupted answer, and its haystack is not a named one
    monkeypatch.setattr(patching, "load_haystack", lambda name: haystack_text())
    monkeypatch.setitem(patching.CORRUPTED_ANSWERS, NEEDLE.real_needle, ["echo delta charlie bravo alpha"])
    result = method_map("patching", patching.head_patching_scores, model, traced)
    assert _top(result.scores()) == PLANTED and result.scores()[PLANTED] == pytest.approx(1.0, abs=1e-3)
    assert result.settings["unscored"] == []
    monkeypatch.delitem(patching.CORRUPTED_ANSWERS, NEEDLE.real_needle)
    unpaired = method_map("patching", patching.head_patching_scores, model, traced)
    assert unpaired.settings["unscored"] == [t.key for t in trials] and not unpaired.successful


def test_learned_gates_keep_the_planted_head_full():
    # A 16-token window: only the planted head needs the far-back answer; the previous-token
    # head works inside any window and the other heads write nothing, so the L1 term closes them.
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trials = [build_trial(model.tokenizer, haystack, NEEDLE, 260, depth) for depth in (20, 50, 80)]
    traced = trace_trials(model, trials, QUIET)
    training = duo_gates.GateTraining(steps=60, window=16)
    gates = duo_gates.trial_scores(model, traced, training)[0]
    assert gates[PLANTED] > 0.9
    assert max(gates[layer, head] for layer in range(2) for head in range(4) if (layer, head) != PLANTED) < 0.1
    assert all(p.requires_grad for p in model.parameters())  # the model is handed back as it was


def test_gate_mixing_at_0_is_the_streaming_cache_and_at_1_the_full_model():
    # gate 0 on every head must be the masked KV simulation with no full head (an independent
    # implementation of the same streaming rule); gate 1, the model untouched
    model = build_planted_model()
    ids = tokenize_haystack(model.tokenizer, haystack_text(), 120)
    policy = KVPolicy("streaming", 2, 4, 4, frozenset(), sink=2, window=8)
    final = "blocks.1.hook_resid_post"
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=final)
        with KVCompression(policy, cache="masked")(model):
            _, streamed = model.run_with_cache(torch.tensor([ids]), names_filter=final)
        closed = duo_gates._final_hidden(model, ids, torch.zeros(2, 4), policy)
        opened = duo_gates._final_hidden(model, ids, torch.ones(2, 4), policy)
    assert not torch.allclose(cache[final][0], streamed[final][0])  # the window matters here
    torch.testing.assert_close(closed, streamed[final][0])
    torch.testing.assert_close(opened, cache[final][0])


def test_gate_training_uses_duo_attentions_published_settings_and_schedule():
    # mit-han-lab/duo-attention scripts/run_train.sh: lr 0.02, reg_weight 0.05 in every published run
    training = duo_gates.GateTraining()
    assert (training.lr, training.l1) == (0.02, 0.05)
    for steps in (150, 60, 7):
        ramp = steps // 5  # duo_attn/train.py L346-L353, written out
        published = [min(1, max((s + 1) / ramp, 0.1), max((steps - s) / ramp, 0.1)) for s in range(steps)]
        ours = [duo_gates.lr_factor(s, steps) for s in range(steps)]
        assert ours == pytest.approx(published) and max(ours) == 1.0  # never over the set lr


def test_gates_never_leave_0_1_during_training(monkeypatch):
    # DuoAttention clamps the gates to [0, 1] before every step (duo_attn/train.py L98-L102): with
    # a learning rate big enough that one AdamW step overshoots both ends, every step must still
    # see gates inside [0, 1], and some must have been clamped to an end
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    trial = build_trial(model.tokenizer, haystack, NEEDLE, 260, 50)
    start, end = trial.answer_span
    sample = (list(trial.prompt_ids) + list(trial.prompt_ids[start : end - 1]), len(trial.prompt_ids) - 1)
    seen = []
    forward = duo_gates._final_hidden

    def recording(model, ids, gates, policy):
        if gates is not None:
            seen.append(gates.detach().clone())
        return forward(model, ids, gates, policy)

    monkeypatch.setattr(duo_gates, "_final_hidden", recording)
    training = duo_gates.GateTraining(steps=10, window=16, lr=5.0)
    gates = duo_gates.learned_gates(model, [sample], training, progress=False)
    assert len(seen) == 10 and all(float(g.min()) >= 0.0 and float(g.max()) <= 1.0 for g in seen)
    assert any(bool((g == 0).any()) for g in seen[1:])  # the L1 term drove gates past 0: clamped back
    assert float(gates.min()) >= 0.0 and float(gates.max()) <= 1.0


def test_gate_mixing_clamps_the_gates_as_duo_attention_does():
    # duo_attn/patch/llama.py L120-L129: the gate is clamped to [0, 1] where it mixes
    model = build_planted_model()
    ids = tokenize_haystack(model.tokenizer, haystack_text(), 120)
    policy = KVPolicy("streaming", 2, 4, 4, frozenset(), sink=2, window=8)
    with torch.no_grad():
        for outside, inside in ((3.0, 1.0), (-2.0, 0.0)):
            torch.testing.assert_close(
                duo_gates._final_hidden(model, ids, torch.full((2, 4), outside), policy),
                duo_gates._final_hidden(model, ids, torch.full((2, 4), inside), policy),
            )


def test_razor_union_ranks_the_papers_selection_first():
    # RazorAttention keeps the union of the top 1% of heads by echo score and the top 14% by
    # induction score: the union, found by hand with sets, must be the map's top heads
    generator = torch.Generator().manual_seed(0)
    echo, induction = torch.rand(20, 10, generator=generator), torch.rand(20, 10, generator=generator)
    flat_echo, flat_induction = echo.flatten().tolist(), induction.flatten().tolist()
    top_echo = set(sorted(range(200), key=lambda i: -flat_echo[i])[:2])  # 1% of 200 heads
    top_induction = set(sorted(range(200), key=lambda i: -flat_induction[i])[:28])  # 14%
    union = top_echo | top_induction
    scores = razor.union_scores(echo, induction).flatten()
    assert set(scores.topk(len(union)).indices.tolist()) == union
    assert {i for i in range(200) if scores[i] >= 1 - 0.15 - 1e-6} == union
    # nested: at every K the top K are top echo and top induction heads, in the paper's proportion
    for k in (1, 5, 15):
        top = set(scores.topk(k).indices.tolist())
        ranked_echo = sorted(range(200), key=lambda i: -flat_echo[i])
        ranked_induction = sorted(range(200), key=lambda i: -flat_induction[i])
        assert all(i in ranked_echo[: len(top)] or i in ranked_induction[: len(top)] for i in top)


def test_razor_keeps_the_sum_by_default_and_gives_the_papers_union_when_asked(planted):
    # the atlas's razor map is echo + induction (a named deviation): on the planted model it ranks
    # the duplicate-token decoy first; the paper's union ranks the top induction head, the planted one
    model, _, traced = planted
    assert _top(razor.trial_scores(model, traced)[0]) == DECOY
    assert _top(razor.trial_scores(model, traced, rule="union")[0]) == PLANTED
    with pytest.raises(ValueError, match="unknown rule"):
        razor.trial_scores(model, traced, rule="max")


def test_gate_training_refuses_samples_it_cannot_use():
    model = build_planted_model()
    with pytest.raises(InputError, match="max_tokens"):
        duo_gates.learned_gates(model, [([1, 2, 3] * 50, 100)], duo_gates.GateTraining(steps=1, max_tokens=100), progress=False)
    with pytest.raises(InputError, match="inside them"):
        duo_gates.learned_gates(model, [([1, 2, 3], 3)], duo_gates.GateTraining(steps=1), progress=False)
