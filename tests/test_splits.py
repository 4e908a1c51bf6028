"""Held-out splits compared by content: a near-duplicate needle, the same question under another
id, a SQuAD question on a paragraph or article of the ranking's, the same haystack on request;
settings written before content checks (ids only) resolved from the built-in needles and
corpora, or refused as "content unknown"; and what a run records of it. Hand-made data only."""

import argparse
import itertools
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from rh_lens.app import workflows
from rh_lens.app.options import add_grid_arguments, add_other_haystack_argument, grid_from_args
from rh_lens.detection.records import load_results
from rh_lens.errors import InputError, RunDirectoryError
from rh_lens.execution.runs import InProcess, run_trials
from rh_lens.tasks import data
from rh_lens.tasks.data import load_corpus
from rh_lens.tasks.documents import QAGrid
from rh_lens.tasks.needle_bank import NEEDLE_BANK, NEEDLE_SPLITS
from rh_lens.tasks.needles import BUILTIN_LONG_NEEDLES, BUILTIN_NEEDLES, Needle
from rh_lens.tasks.niah import Grid
from rh_lens.tasks.splits import NEAR_DUPLICATE, check_split, compare_items, held_out, split_content

DATA = Path(__file__).parent / "data"
FENNICK, FENNICK_LONG = BUILTIN_NEEDLES[2], BUILTIN_LONG_NEEDLES[2]


def grid(*needles: Needle, haystack: str = "synthetic") -> Grid:
    return Grid(needles=tuple(needles), lengths=(500,), depths=(50,), haystacks=(haystack,))


def flagged(ranked, evaluated) -> dict[str, list]:
    return {name: found for name, found in check_split(ranked, evaluated)["checks"].items() if found}


# --- NIAH -----------------------------------------------------------------------------------


def test_the_threshold_catches_the_fennick_pair_and_no_other_two_builtin_needles():
    needles = list(dict.fromkeys((*BUILTIN_NEEDLES, *BUILTIN_LONG_NEEDLES, *NEEDLE_BANK)))
    assert len(needles) == 46
    items = {n: split_content(grid(n).settings())[0] for n in needles}
    for a, b in itertools.combinations(needles, 2):
        found = {name for name, pairs in compare_items(items[a], items[b]).items() if pairs}
        if {a, b} == {FENNICK, FENNICK_LONG}:
            assert found == {"same_question", "near_duplicate_needle"}
            (pair,) = compare_items(items[a], items[b])["near_duplicate_needle"]
            assert pair["shared"] == "needle Jaccard 0.71"
        else:
            assert not found, (a.needle, b.needle, found)
    assert NEAR_DUPLICATE == 0.5


def test_a_reworded_needle_is_a_near_duplicate_even_with_its_own_question():
    reworded = Needle(
        needle="The lighthouse keeper on Fennick Island hid his ledger in a green tin box under the kitchen stairs at night.",
        question="What did the keeper put under the kitchen stairs?",
        real_needle="a green tin box",
    )
    found = flagged(grid(FENNICK).settings(), grid(reworded).settings())
    assert set(found) == {"near_duplicate_needle", "same_haystack"}
    assert found["near_duplicate_needle"][0] == {
        "ranked": f"niah:{FENNICK.id}",
        "evaluated": f"niah:{reworded.id}",
        "shared": "needle Jaccard 0.92",
    }


def test_the_fennick_island_pair_is_refused_with_heldout(caplog):
    detection = load_results(DATA / "smollm2-135m-small.json")  # ranked on the 3 built-in needles
    long_set = grid(*BUILTIN_LONG_NEEDLES, haystack="pydoc")
    with pytest.raises(InputError, match=r"split check same_question: niah:\w+ ~ niah:\w+: Where did the lighthouse keeper") as e:
        workflows._ranking(detection, long_set, heldout=True)
    assert "(also failing: near_duplicate_needle)" in str(e.value) and "--needles bank-b" in str(e.value)
    assert "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="rh_lens"):
        _, settings = workflows._ranking(detection, long_set)  # without --heldout: a warning
    assert "fail the split check same_question, near_duplicate_needle" in caplog.text
    assert settings["heldout"] is False and settings["shares_nothing"] is False
    assert settings["shared_with_ranking"] == []  # no id in common: the old check let it through


def test_bank_a_and_bank_b_are_held_out():
    found = check_split(grid(*NEEDLE_SPLITS["bank-a"]).settings(), grid(*NEEDLE_SPLITS["bank-b"], haystack="pydoc").settings())
    assert found["passed"] and found["violations"] == [] and found["content_unknown"] == []
    assert not any(found["checks"].values())


def test_heldout_is_recorded_as_asked_and_shares_nothing_as_found(caplog):
    detection = load_results(DATA / "smollm2-135m-small.json")
    bank_b = grid(*NEEDLE_SPLITS["bank-b"])
    with caplog.at_level(logging.WARNING, logger="rh_lens"):
        _, settings = workflows._ranking(detection, bank_b)
    assert settings["heldout"] is False and settings["shares_nothing"] is True and not caplog.text
    assert settings["split_check"]["passed"] and settings["split_check"]["checks"]["same_item"] == []
    _, settings = workflows._ranking(detection, bank_b, heldout=True)
    assert settings["heldout"] is True and settings["shares_nothing"] is True
    assert json.loads(json.dumps(settings)) == settings  # plain data: it goes into run.json
    # results files read either way
    assert held_out(settings) is True and held_out({"heldout": True}) is True and held_out({}) is None
    assert held_out({"heldout": False, "shares_nothing": True}) is True


def test_the_same_haystack_is_reported_and_refused_only_on_request(tmp_path):
    ranked = grid(*NEEDLE_SPLITS["bank-a"], haystack="pydoc").settings()
    same = grid(*NEEDLE_SPLITS["bank-b"], haystack="pydoc").settings()
    found = check_split(ranked, same)
    assert found["passed"] and [o["ranked"] for o in found["checks"]["same_haystack"]] == ["pydoc"]
    assert check_split(ranked, same, other_haystack=True)["violations"] == ["same_haystack"]
    assert check_split(ranked, grid(*NEEDLE_SPLITS["bank-b"]).settings(), other_haystack=True)["passed"]
    with pytest.raises(InputError, match="split check same_haystack: pydoc ~ pydoc.*--other-haystack"):
        workflows._split_check(ranked, same, False, "the ranking", other_haystack=True)  # implies --heldout
    parser = argparse.ArgumentParser()
    add_other_haystack_argument(parser)
    assert parser.parse_args(["--other-haystack"]).other_haystack


# --- settings written before content checks ------------------------------------------------


def test_old_settings_of_builtin_needles_resolve_by_id():
    old = {"haystack": ["pydoc"], "needles": [n.id for n in (*BUILTIN_NEEDLES, NEEDLE_BANK[7])], "lengths": [500]}
    items, unknown = split_content(old)
    assert unknown == [] and [i["answer"] for i in items] == [n.real_needle for n in (*BUILTIN_NEEDLES, NEEDLE_BANK[7])]
    assert set(flagged(old, grid(FENNICK_LONG).settings())) == {"same_question", "near_duplicate_needle"}
    assert check_split(old, grid(*NEEDLE_SPLITS["bank-b"]).settings())["passed"]


def test_unknown_content_is_refused_with_heldout_and_recorded_without(caplog):
    detection = load_results(DATA / "smollm2-135m-small.json")
    mine = replace(detection, settings={**detection.settings, "needles": ["0badc0de", *detection.settings["needles"]]})
    with pytest.raises(
        InputError, match=r"records 1 of its needles or questions by id only \(niah:0badc0de\).*content is unknown"
    ):
        workflows._ranking(mine, grid(*NEEDLE_SPLITS["bank-b"]), heldout=True)
    with caplog.at_level(logging.WARNING, logger="rh_lens"):
        _, settings = workflows._ranking(mine, grid(*NEEDLE_SPLITS["bank-b"]))
    assert settings["heldout"] is False and settings["shares_nothing"] is False and not caplog.text
    assert settings["split_check"]["content_unknown"] == ["niah:0badc0de"]
    # a shared id still counts when the content is unknown
    assert check_split(mine.settings, {"needles": ["0badc0de"]})["checks"]["same_item"][0]["evaluated"] == "niah:0badc0de"


# --- SQuAD ----------------------------------------------------------------------------------

OMBER = "The river Omber flows north. Its source is the lake Tarn and the lake Tarn feeds it."
VELL = "The river Vell is short. It ends in the marsh of Kell."
PEAK = "Mount Garrow is the highest peak of the Sill range, at 2,914 metres."


def _qa(id_, question, answer, context):
    return {"id": id_, "question": question, "answers": [{"text": answer, "answer_start": context.find(answer)}]}


def _squad() -> dict:
    fillers = [
        {
            "title": f"Filler{i}",
            "paragraphs": [{"context": f"Filler {i} paragraph {j} is about stones.", "qas": []} for j in range(3)],
        }
        for i in range(3)
    ]
    rivers = {
        "title": "Rivers",
        "paragraphs": [
            {
                "context": OMBER,
                "qas": [
                    _qa("q-feeds", "What feeds the river Omber?", "the lake Tarn", OMBER),
                    _qa("q-flows", "Which way does the Omber flow?", "north", OMBER),
                ],
            },
            {"context": VELL, "qas": [_qa("q-ends", "Where does the Vell end?", "the marsh of Kell", VELL)]},
        ],
    }
    mountains = {
        "title": "Mountains",
        "paragraphs": [{"context": PEAK, "qas": [_qa("q-peak", "How high is Mount Garrow?", "2,914 metres", PEAK)]}],
    }
    return {"version": "v2.0", "data": [rivers, mountains] + fillers}


@pytest.fixture
def squad_file(tmp_path):
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(_squad()))
    return str(path)


def _one(data: str, id_: str, **kwargs) -> QAGrid:
    """The grid of question `id_` alone (its place in the seeded order found first)."""
    order = [q.id for q in QAGrid("squad", (0, 4), data=data).selected()]
    return QAGrid("squad", (order.index(id_), order.index(id_) + 1), lengths=(200,), depths=(50,), data=data, **kwargs)


def test_two_questions_on_one_paragraph_are_refused(squad_file, tmp_path):
    ranking, evaluation = _one(squad_file, "q-feeds"), _one(squad_file, "q-flows")
    assert ranking.selected()[0].gold == evaluation.selected()[0].gold  # the same paragraph, other ids
    found = flagged(ranking.settings(), evaluation.settings())
    assert set(found) == {"shared_paragraph", "shared_title", "same_haystack"}
    assert found["shared_title"][0]["shared"] == "article Rivers"
    with pytest.raises(
        InputError,
        match=r"on a gold paragraph of the ranking's questions \(split check shared_paragraph: squad:q-flows ~ squad:q-feeds",
    ):
        workflows.atlas_grid("no-model-is-loaded", ranking, evaluation, tmp_path / "atlas", heldout=True)
    assert not (tmp_path / "atlas").exists()  # refused before anything is written


def test_another_paragraph_of_the_same_article_is_refused(squad_file):
    found = check_split(_one(squad_file, "q-feeds").settings(), _one(squad_file, "q-ends").settings())
    assert found["violations"] == ["shared_title"]
    with pytest.raises(InputError, match="from an article the ranking's questions come from.*--disjoint-from"):
        workflows._split_check(_one(squad_file, "q-feeds").settings(), _one(squad_file, "q-ends").settings(), True, "x")


def test_questions_from_different_articles_pass(squad_file):
    found = check_split(_one(squad_file, "q-feeds").settings(), _one(squad_file, "q-peak").settings())
    assert found["passed"] and found["violations"] == []
    assert [o["ranked"] for o in found["checks"]["same_haystack"]] == ["squad paragraphs"]  # the same distractor pool
    assert not check_split(_one(squad_file, "q-feeds").settings(), _one(squad_file, "q-peak").settings(), other_haystack=True)[
        "passed"
    ]


def test_disjoint_from_leaves_out_what_the_check_would_refuse(squad_file):
    ranking = _one(squad_file, "q-flows")
    evaluation = QAGrid("squad", (0, 4), lengths=(200,), depths=(50,), data=squad_file, disjoint_from=ranking.questions)
    assert [q.id for q in evaluation.selected()] == ["q-peak"]
    settings = evaluation.settings()
    assert (
        settings["dropped"] == 3 and settings["disjoint_from"] == list(ranking.questions) and settings["questions"] == ["q-peak"]
    )
    assert workflows._split_check(ranking.settings(), settings, True, "the ranking")["shares_nothing"] is True
    with pytest.raises(InputError, match="every one shares"):
        replace(_one(squad_file, "q-ends"), disjoint_from=ranking.questions).selected()
    # from the command line, in --evaluate's grid options too
    parser = argparse.ArgumentParser()
    add_grid_arguments(parser)
    args = parser.parse_args(["--task", "squad", "--questions", "0:4", "--disjoint-from", "1:2", "--data", squad_file])
    assert grid_from_args(args).disjoint_from == (1, 2)
    with pytest.raises(InputError, match="--disjoint-from is for --task squad"):
        grid_from_args(parser.parse_args(["--disjoint-from", "0:2"]))


def test_old_question_settings_resolve_from_the_corpus_when_the_data_is_the_same(squad_file, monkeypatch):
    monkeypatch.setattr(data, "ruler_file", lambda name: Path(squad_file))  # "RULER's copy" is the hand-made file
    load_corpus.cache_clear()
    try:
        new = _one(squad_file, "q-feeds").settings()
        old = {k: v for k, v in new.items() if k != "question_content"}
        items, unknown = split_content(old)
        assert unknown == [] and items[0]["articles"] == ["Rivers"]
        assert check_split(old, _one(squad_file, "q-flows").settings())["violations"] == ["shared_paragraph", "shared_title"]
        other = split_content({**old, "data_sha256": "0" * 64})  # another file: not found again
        assert other == ([], ["squad:q-feeds"])
    finally:
        load_corpus.cache_clear()


def test_a_run_started_before_its_split_was_recorded_resumes_and_records_it(tmp_path):
    """A run directory whose run.json lacks the split keys (written before they existed)
    resumes without redoing its trials; a change in what the trials are is still refused."""

    @dataclass
    class Record:
        key: str
        success: bool = True
        rouge_recall: float = 1.0
        prompt_sha256: str | None = None

        @classmethod
        def from_json(cls, data):
            return cls(**data)

    @dataclass
    class FakeTrial:
        key: str
        prompt_ids: tuple = (1, 2)
        prompt_sha256: str | None = None

    ran = []

    def task(model, trials):
        for i, t in enumerate(trials):
            ran.append(t.key)
            yield i, Record(t.key)

    trials = [FakeTrial("a"), FakeTrial("b")]
    old = {"needles": ["x"], "lengths": [1000]}
    run_trials(trials, task, Record, InProcess(None), out_dir=tmp_path, settings=old, progress=False)
    new = {**old, "needle_content": [{"id": "x"}], "heldout": True, "split_check": {"passed": True}}
    run_trials(trials, task, Record, InProcess(None), out_dir=tmp_path, resume=True, settings=new, progress=False)
    assert ran == ["a", "b"]  # nothing ran again
    assert json.loads((tmp_path / "run.json").read_text()) == new
    with pytest.raises(RunDirectoryError, match="settings differ"):
        run_trials(trials, task, Record, InProcess(None), out_dir=tmp_path, resume=True, settings={**new, "lengths": [2000]})
