"""NIAH trials: haystacks, needles, insertion at sentence ends, exact answer spans."""

import json
from pathlib import Path

import pytest
from planted import NEEDLE, build_tokenizer, haystack_text

from rh_lens.errors import TrialError
from rh_lens.tasks.data import load_haystack, load_needles, pydoc_haystack, synthetic_haystack
from rh_lens.tasks.needles import BUILTIN_NEEDLES, Needle
from rh_lens.tasks.niah import build_trial, linear_grid, tokenize_haystack, trial_grid

SHARED = Path(__file__).resolve().parents[2] / "shared" / "niah"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="reference NIAH data (../shared/niah) not present")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def haystack(tokenizer):
    return tokenize_haystack(tokenizer, haystack_text(), 300)


def test_pydoc_haystack_has_no_rst_underlines():
    text = pydoc_haystack()
    assert len(text) > 100_000
    assert "---" not in text and "===" not in text and "***" not in text and "~~~" not in text


def test_load_haystack_sources(tmp_path):
    (tmp_path / "b.txt").write_text("Second file.")
    (tmp_path / "a.txt").write_text("First file.")
    assert load_haystack(tmp_path) == "First file.\n\nSecond file."
    assert load_haystack("synthetic").startswith("The grass is green.")
    assert load_haystack("synthetic") == synthetic_haystack()
    with pytest.raises(ValueError):
        load_haystack(tmp_path / "missing")
    with pytest.raises(ValueError):
        load_haystack(tmp_path / "b.txt" / "x")


def test_needles_jsonl(tmp_path):
    path = tmp_path / "needles.jsonl"
    path.write_text(json.dumps({"needle": "N.", "question": "Q?", "real_needle": "N"}) + "\n\n")
    assert load_needles(path) == [Needle("N.", "Q?", "N")]
    path.write_text('{"needle": "only"}\n')
    with pytest.raises(ValueError, match="needles.jsonl:1"):
        load_needles(path)


@needs_shared
def test_reference_needles_load():
    needles = load_needles(SHARED / "detect_haystacks" / "needles.jsonl")
    assert len(needles) == 3
    assert needles[1].real_needle.startswith("take a walk in Chaoyang Park")


def test_builtin_needles_contain_their_answers():
    assert len(BUILTIN_NEEDLES) >= 3
    for needle in BUILTIN_NEEDLES:
        assert needle.real_needle.lower() in needle.needle.lower()
    assert len({n.id for n in BUILTIN_NEEDLES}) == len(BUILTIN_NEEDLES)


def test_linear_grid_matches_reference_rounding():
    assert linear_grid(0, 100, 10) == [0, 11, 22, 33, 44, 56, 67, 78, 89, 100]
    assert linear_grid(1000, 50000, 20)[:3] == [1000, 3579, 6158]


@pytest.mark.parametrize("depth", [0, 10, 50, 90, 100])
def test_answer_span_is_exact_and_needle_sits_at_a_sentence_end(tokenizer, haystack, depth):
    trial = build_trial(tokenizer, haystack, NEEDLE, 300, depth, max_tokens=1000)
    start, end = trial.answer_span
    assert tokenizer.decode(trial.prompt_ids[start:end]) == NEEDLE.real_needle
    needle_start = start - len(tokenizer("The secret code is:", add_special_tokens=False)["input_ids"])
    before = tokenizer.decode(trial.prompt_ids[needle_start - 1 : needle_start]) if needle_start > 0 else "."
    if depth < 100:  # as in the reference, depth 100 appends the needle to the cut haystack
        assert before == "."  # inserted right after a sentence end
    assert trial.prompt.endswith("Question: What is the secret code?\nAnswer:")


def test_depth_moves_the_needle_through_the_haystack(tokenizer, haystack):
    spans = [build_trial(tokenizer, haystack, NEEDLE, 300, d).answer_span[0] for d in (0, 25, 50, 75, 100)]
    assert spans == sorted(spans) and spans[0] < 10 and len(set(spans)) == 5


def test_context_length_sets_prompt_length(tokenizer, haystack):
    short = build_trial(tokenizer, haystack, NEEDLE, 260, 50)
    long = build_trial(tokenizer, haystack, NEEDLE, 300, 50)
    assert len(long.prompt_ids) - len(short.prompt_ids) == 40


def test_too_long_for_the_model_fails_loudly(tokenizer, haystack):
    with pytest.raises(TrialError, match="longer than the model's context"):
        build_trial(tokenizer, haystack, NEEDLE, 300, 50, max_tokens=64)


def test_answer_missing_from_needle_fails_loudly(tokenizer, haystack):
    bad = Needle(NEEDLE.needle, NEEDLE.question, "zulu yankee")
    with pytest.raises(TrialError, match="not part of needle"):
        build_trial(tokenizer, haystack, bad, 300, 50)


def test_haystack_too_short_fails_loudly(tokenizer):
    with pytest.raises(TrialError, match="haystack has"):
        build_trial(tokenizer, tokenizer("river stone.")["input_ids"], NEEDLE, 300, 50)


def test_answer_is_found_case_insensitively(tokenizer, haystack):
    # The reference's third needle answers "Because ..." inside "... because ...".
    needle = Needle("The secret code is: alpha bravo charlie.", NEEDLE.question, "Alpha bravo charlie")
    trial = build_trial(tokenizer, haystack, needle, 300, 50)
    start, end = trial.answer_span
    assert tokenizer.decode(trial.prompt_ids[start:end]) == "alpha bravo charlie"


def test_trial_grid_pairs_haystacks_with_needles(tokenizer, tmp_path):
    for name in ("h1", "h2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "text.txt").write_text(haystack_text(seed=len(name)))
    other = Needle("The secret code is: echo delta.", NEEDLE.question, "echo delta")
    trials = trial_grid(tokenizer, [NEEDLE, other], [280, 300], [0, 100], haystacks=[tmp_path / "h1", tmp_path / "h2"])
    assert len(trials) == 8
    assert {t.haystack for t in trials if t.needle == other} == {"h2"}
    assert len({t.key for t in trials}) == 8
    with pytest.raises(ValueError, match="one per needle"):
        trial_grid(tokenizer, [NEEDLE, other], [300], [0], haystacks=["synthetic"] * 3)


def test_long_answer_needles_are_a_named_set():
    from rh_lens.tasks.data import load_needles
    from rh_lens.tasks.needles import BUILTIN_LONG_NEEDLES, answer_chars

    assert load_needles("long") == list(BUILTIN_LONG_NEEDLES)
    for needle in BUILTIN_LONG_NEEDLES:
        assert len(needle.real_needle.split()) >= 10  # 13-15 tokens for each catalogue tokenizer
        start, end = answer_chars(needle)
        assert needle.needle[start:end] == needle.real_needle
