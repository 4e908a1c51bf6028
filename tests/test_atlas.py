"""The head atlas on the planted model: every method's map, their agreement, and what masking
each method's top head and keeping each method's KV heads do on other trials."""

import shutil

import pytest
from planted import DECOY, NEEDLE, PLANTED, build_planted_model, haystack_text

from rh_lens.analysis.atlas import Atlas, AtlasOptions, build_atlas
from rh_lens.errors import InputError
from rh_lens.execution.options import RunOptions
from rh_lens.heads import Head
from rh_lens.tasks.niah import build_trial, tokenize_haystack

OPTIONS = AtlasOptions(head_fractions=(0.1,), random_seeds=2, window=16, resamples=50)


@pytest.fixture(scope="module")
def atlas_run(tmp_path_factory):
    model = build_planted_model()
    haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
    detection = [build_trial(model.tokenizer, haystack, NEEDLE, 260, depth) for depth in (20, 80)]
    evaluation = [build_trial(model.tokenizer, haystack, NEEDLE, 300, depth) for depth in (10, 50, 90)]
    out = tmp_path_factory.mktemp("atlas")
    atlas = build_atlas(model, detection, evaluation, out, options=OPTIONS, run=RunOptions(progress=False))
    return model, detection, evaluation, out, atlas


def test_masking_each_methods_top_head(atlas_run):
    _, _, _, _, atlas = atlas_run
    assert atlas.ks == [1]  # 10% of 8 heads
    assert atlas.recall("none", 0) == 1.0
    for method in ("retrieval", "attention-mass", "shifted-copy", "output"):  # their top head is the planted one
        assert Head.coerce(_top(atlas, method)) == Head(*PLANTED)
        assert atlas.recall(method, 1) == 0.0
    for method in ("query-focused", "razor"):  # their top head is the decoy, which writes nothing
        assert Head.coerce(_top(atlas, method)) == Head(*DECOY)
        assert atlas.recall(method, 1) == 1.0
    random = next(r for r in atlas.masking if r["method"] == "random")
    assert random["n_seeds"] == 2


def _top(atlas: Atlas, method: str) -> str:
    scores = atlas.maps[method]
    layer, head = max(((l, h) for l in range(atlas.n_layers) for h in range(atlas.n_heads)), key=lambda lh: scores[lh[0]][lh[1]])
    return f"{layer}-{head}"


def test_kv_policies_at_the_same_bytes(atlas_run):
    _, _, _, _, atlas = atlas_run
    kv = {r["method"]: r for r in atlas.kv}
    assert kv["full"]["mean_recall"] == 1.0 and kv["full"]["kv_kept"] == 1.0
    # 2 of the 8 KV heads kept whole: the retrieval ranking keeps the planted head's, so the
    # answer survives; StreamingLLM's 16-token window cannot see the needle
    assert kv["retrieval"]["mean_recall"] == 1.0
    assert kv["streaming"]["mean_recall"] < 0.5
    assert kv["retrieval"]["kv_kept"] == pytest.approx(kv["streaming"]["kv_kept"], abs=0.02)


def test_agreement_and_table(atlas_run):
    _, _, _, _, atlas = atlas_run
    pairs = {(r["a"], r["b"]) for r in atlas.agreement}
    n = len(atlas.methods)
    assert len(pairs) == n * (n - 1) // 2
    same = next(r for r in atlas.agreement if {r["a"], r["b"]} == {"retrieval", "shifted-copy"})
    assert same["spearman"] > 0.5 and same["spearman_interval"] is not None
    table = {row["method"]: row for row in atlas.table()}
    assert table["retrieval"]["recall_masked"] == {1: 0.0}
    kv = {r["method"]: r for r in atlas.kv}
    assert table["retrieval"]["kv_kept"] == kv["retrieval"]["kv_kept"] < 1.0
    assert set(table["retrieval"]["spearman"]) == set(atlas.methods) - {"retrieval"}


def test_resume_reads_back_without_redoing(atlas_run, monkeypatch):
    model, detection, evaluation, out, atlas = atlas_run
    import rh_lens.analysis.atlas as atlas_module

    monkeypatch.setattr(atlas_module, "trace_trials", lambda *a, **k: pytest.fail("traced again"))
    again = build_atlas(model, detection, evaluation, out, options=OPTIONS, run=RunOptions(progress=False, resume=True))
    assert again.maps == atlas.maps and again.masking == atlas.masking
    assert Atlas.load(out / "atlas.json") == again


def test_bad_options():
    with pytest.raises(InputError, match="unknown method"):
        AtlasOptions(methods=("retrieval", "nope"))
    with pytest.raises(InputError, match="fractions"):
        AtlasOptions(head_fractions=(0.0,))


def test_top_heads_and_results_file_entries():
    maps = {"m": [[0.5, 0.0], [0.5, 0.9]]}
    atlas = Atlas(model="x", n_layers=2, n_heads=2, methods=["m"], ks=[2], maps=maps, agreement=[], masking=[], kv=[])
    # best first, a tie broken by (layer, head): what the masking condition of K=2 masks
    assert atlas.top_heads("m", 2) == [Head(1, 1), Head(0, 0)]
    entry = {"set": "bank-b", **atlas.to_json()}  # an entry of experiments' head_atlas.json
    assert Atlas.from_json(entry) == atlas
    with pytest.raises(InputError, match="not an rh_lens atlas"):
        Atlas.from_json({"format": "rh_lens.detection/1"})


def test_resume_computes_only_the_maps_it_lacks(atlas_run):
    model, detection, evaluation, out, atlas = atlas_run
    kept = (out / "maps" / "retrieval.json").stat().st_mtime_ns
    (out / "maps" / "razor.json").unlink()
    (out / "atlas.json").unlink()
    again = build_atlas(model, detection, evaluation, out, options=OPTIONS, run=RunOptions(progress=False, resume=True))
    assert (out / "maps" / "razor.json").exists() and (out / "maps" / "retrieval.json").stat().st_mtime_ns == kept
    assert again.maps == atlas.maps and again.masking == atlas.masking


def test_an_atlas_stopped_among_its_maps_resumes(atlas_run, tmp_path):
    model, detection, evaluation, out, atlas = atlas_run
    stopped = tmp_path / "stopped"
    (stopped / "maps").mkdir(parents=True)  # died after its first map: no run.json or conditions yet
    shutil.copy(out / "maps" / "retrieval.json", stopped / "maps")
    again = build_atlas(model, detection, evaluation, stopped, options=OPTIONS, run=RunOptions(progress=False, resume=True))
    assert again.maps == atlas.maps and again.masking == atlas.masking


def test_overview_figure_draws_each_atlas_at_its_smallest_k(atlas_run):
    from rh_lens.app.plots import atlas_overview

    _, _, _, _, atlas = atlas_run
    figure = atlas_overview({"one": atlas, "two": atlas})
    left, right = figure.axes
    heights = {c.get_label(): [b.get_height() for b in c] for c in left.containers}
    assert heights["retrieval"] == [0.0, 0.0] and heights["razor"] == [1.0, 1.0]  # planted vs decoy head masked
    assert set(heights) == {*atlas.methods, "random"}
    kv = {c.get_label(): [b.get_height() for b in c] for c in right.containers}
    assert kv["retrieval"] == [1.0, 1.0] and kv["streaming"][0] < 0.5
