"""The arithmetic task: problems whose answers follow from their facts, facts placed in the
context (or, for the control, in the question), and exact grading of the final number."""

import re
from dataclasses import replace
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rh_lens.errors import InputError
from rh_lens.model.generation import Generation
from rh_lens.tasks.arithmetic import CHAIN_OF_THOUGHT_TOKENS, MODES, ArithmeticGrid, arithmetic_trial, problem
from rh_lens.tasks.grading import final_number, grade
from rh_lens.tasks.niah import tokenize_haystack


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Every byte one token: any text round-trips, no download."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="!")


HAYSTACK = " ".join(f"The weather on day {i} was mild and the river ran slow." for i in range(400))


def numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", text)]


@pytest.mark.parametrize("index", range(30))
def test_every_answer_follows_from_its_facts(index):
    p = problem(index)
    assert problem(index) == p  # the same problem everywhere
    values = [numbers(f)[0] for f in p.facts]
    expected = values[0] - values[1] if p.question.startswith("How many more") else sum(values)
    assert p.answer == expected and p.answer > 0
    assert f"= {p.answer}." in p.steps and all(str(v) in p.steps for v in values)
    for fact in p.facts:  # each asked day is in the question
        assert fact.split(",")[0].removeprefix("On ") in p.question
    assert not set(p.distractors) & set(p.facts)


def test_problems_differ_and_a_seed_gives_another_sequence():
    ids = {problem(i).id for i in range(50)}
    assert len(ids) == 50
    assert problem(0, seed=1) != problem(0)


@pytest.mark.parametrize("mode", MODES)
def test_the_facts_are_in_the_context_or_in_the_question(mode):
    tokenizer = byte_tokenizer()
    p = problem(3)
    trial = arithmetic_trial(tokenizer, p, tokenize_haystack(tokenizer, HAYSTACK, 3000), 2000, 50, mode, False, "weather")
    context, _, asked = trial.prompt.rpartition("Question: ")
    for distractor in p.distractors:
        assert distractor in context
    for fact in p.facts:
        assert (fact in asked) == (mode == "in-question")
        assert (context.count(fact) == 1) == (mode != "in-question")
    assert trial.grading == "number" and trial.needle.real_needle == str(p.answer)
    assert tokenizer.decode(trial.prompt_ids) == trial.prompt
    examples = "The answer is 33." in trial.prompt
    assert examples == (mode != "answer-only")
    with pytest.raises(InputError):
        arithmetic_trial(tokenizer, p, tokenize_haystack(tokenizer, HAYSTACK, 3000), 2000, 50, "guess", False, "weather")


@pytest.mark.parametrize(
    "response, number",
    [
        ("82", "82"),
        ("On Monday 37 and on Tuesday 45. 37 + 45 = 82. The answer is 82.", "82"),
        ("37 + 45 = 81. The answer is 81. (Earlier I said the answer is 80.) The answer is 81", "81"),
        ("The answer is 1,024.", "1024"),
        ("I cannot tell.", None),
    ],
)
def test_the_final_number_is_read_exactly(response, number):
    assert final_number(response) == number


def test_a_number_trial_is_right_only_with_the_exact_final_number():
    tokenizer = byte_tokenizer()
    p = problem(5)
    trial = arithmetic_trial(tokenizer, p, tokenize_haystack(tokenizer, HAYSTACK, 2000), 1200, 0, "cot", False, "weather")
    model = SimpleNamespace(tokenizer=tokenizer)
    values = numbers(" ".join(p.facts))

    def graded(text: str):
        return grade(model, trial, Generation(tokenizer(text)["input_ids"], None))

    right = graded(f"{p.steps} The answer is {p.answer}.")
    assert right.success and right.rouge_recall == 1.0 and right.response_class == "correct"
    copied = graded(f"The answer is {values[0]}.")  # a number of the context, not the answer
    assert not copied.success and copied.rouge_recall == 0.0 and copied.response_class == "other-context"
    assert graded("The answer is 99999.").response_class == "invented"
    # the answer's digits inside a longer number are not the answer
    assert not graded(f"The answer is {p.answer}0.").success


def test_a_grid_is_every_problem_at_every_length_and_depth_and_records_its_content():
    tokenizer = byte_tokenizer()
    grid = ArithmeticGrid(problems=(2, 5), lengths=(1200, 1500), depths=(0, 100), mode="answer-only", haystack="synthetic")
    trials = grid.trials(tokenizer)
    assert len(trials) == 3 * 2 * 2 and len({t.key for t in trials}) == 12
    settings = grid.settings()
    assert settings["needles"] == [problem(i).id for i in (2, 3, 4)]
    # a bare number ends with its line; a worked chain of thought runs to the end of the turn
    assert all(t.one_line for t in trials) and "answers_end" not in settings
    cot = replace(grid, mode="cot")
    assert not any(t.one_line for t in cot.trials(tokenizer)) and cot.settings()["answers_end"] == "end of turn"
    assert settings["needle_content"][0]["answer"] == str(problem(2).answer)
    with pytest.raises(InputError):
        ArithmeticGrid(problems=(5, 2)).selected()


def test_the_command_line_builds_arithmetic_grids_and_detection_refuses_them(tmp_path):
    from rh_lens.app import workflows
    from rh_lens.app.cli import build_parser
    from rh_lens.app.options import grid_from_args, run_options_from_args

    argv = ["ablate", "--model", "m", "--scores", "s", "--task", "arithmetic", "--mode", "in-question", "--questions", "5:9"]
    grid = grid_from_args(build_parser().parse_args([*argv, "--lengths", "900", "--out", str(tmp_path)]))
    assert grid == ArithmeticGrid(problems=(5, 9), lengths=(900,), depths=grid.depths, mode="in-question")

    def budget(*more: str) -> int:
        return run_options_from_args(build_parser().parse_args([*argv, *more, "--out", str(tmp_path)])).max_new_tokens

    # a chain of thought gets room to finish unless told otherwise; a number or a needle, 50 tokens
    assert budget() == CHAIN_OF_THOUGHT_TOKENS == 256 and budget("--max-new-tokens", "80") == 80
    assert budget("--mode", "answer-only") == 50 and budget("--task", "niah", "--mode", "cot") == 50
    with pytest.raises(InputError, match="not for --task arithmetic"):
        grid_from_args(build_parser().parse_args([*argv, "--needles", "bank-b", "--out", str(tmp_path)]))
    with pytest.raises(InputError, match="no answer span"):
        workflows.detect_grid("never-loaded", grid, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_niah_ranking_judged_on_arithmetic_is_held_out_by_content():
    from rh_lens.tasks.niah import Grid
    from rh_lens.tasks.splits import check_split

    ranking = Grid(lengths=(1000,), depths=(50,), haystacks=("synthetic",)).settings()
    check = check_split(ranking, ArithmeticGrid(problems=(0, 10), haystack="synthetic").settings())
    assert check["split_known"] and check["passed"], check["violations"]
