"""The command line, end to end on the planted-head model (no download)."""

import json
import re
from pathlib import Path

import pytest
from fake_runs import arithmetic_run
from planted import NEEDLE, PLANTED, build_planted_model, haystack_text

import rh_lens.app.cli as cli
import rh_lens.app.workflows as workflows


@pytest.fixture
def inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(workflows, "load_model", lambda name, **kwargs: build_planted_model())
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "text.txt").write_text(haystack_text())
    needles = tmp_path / "needles.jsonl"
    needles.write_text(json.dumps(NEEDLE.__dict__) + "\n")
    return tmp_path, [
        "detect",
        "--model",
        "planted",
        "--haystack",
        str(tmp_path / "hay"),
        "--needles",
        str(needles),
        "--lengths",
        "260",
        "300",
        "--depths",
        "0",
        "100",
        "--max-new-tokens",
        "8",
        "--top",
        "3",
    ]


def test_detect_writes_results_heads_and_heatmap(inputs, capsys):
    tmp_path, argv = inputs
    out = tmp_path / "run"
    assert cli.main(argv + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4/4 trials retrieved" in printed
    assert "retrieval heads (score >= 0.1): 1/8 = 12.5%" in printed
    first_row = printed.splitlines()[3].split()
    assert first_row == ["1", f"{PLANTED[0]}-{PLANTED[1]}", "1.000"]
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((out / "trials").glob("*.json"))) == 4
    assert json.loads((out / "head_scores.json").read_text())["1-2"] == [1.0] * 4

    # A second run into the same directory must be told to resume, and then redoes nothing.
    assert cli.main(argv + ["--out", str(out)]) == 1
    assert "--resume" in capsys.readouterr().err
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0

    assert cli.main(["show", str(out / "results.json"), "--top", "2"]) == 0
    assert "   1     1-2  1.000" in capsys.readouterr().out
    assert cli.main(["show", str(out / "head_scores.json"), "--top", "1"]) == 0


def test_errors_are_one_line(inputs, capsys, tmp_path):
    assert cli.main(["show", str(tmp_path / "missing.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rh-lens: error:") and err.count("\n") == 1


def test_ablate_prints_summary_and_writes_figures(inputs, capsys):
    tmp_path, argv = inputs
    assert cli.main(argv + ["--out", str(tmp_path / "det")]) == 0
    argv = [a if a != "detect" else "ablate" for a in argv if a not in ("--top", "3")]
    out = tmp_path / "abl"
    args = argv + ["--scores", str(tmp_path / "det" / "results.json"), "--top-k", "1", "--random-seeds", "2", "--out", str(out)]
    capsys.readouterr()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[2:5]}  # condition, K, trials, recall [low, high]
    assert float(rows["none"][3]) == 1.0 and float(rows["top-1"][3]) < 0.5 and float(rows["random-1"][3]) == 1.0
    assert rows["none"][2] == rows["top-1"][2] != "0"
    for name in ("niah_heatmaps.png", "recall_vs_k.png", "ablation.json"):
        assert (out / name).stat().st_size > 0
    # `show` reads the run back: the same table, intervals and the paired tests included
    assert cli.main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown.strip() in printed
    test = next(line for line in shown.splitlines() if line.strip().startswith("top-1 vs random-1"))
    assert test.endswith("a < b") or test.endswith("tie")


def test_patch_prints_top_heads_and_writes_figures(inputs, capsys):
    tmp_path, argv = inputs
    assert cli.main(argv + ["--out", str(tmp_path / "det")]) == 0
    needles, hay = argv[argv.index("--needles") + 1], argv[argv.index("--haystack") + 1]
    out = tmp_path / "patch"
    common = [
        "patch",
        "--model",
        "planted",
        "--needles",
        needles,
        "--haystack",
        hay,
        "--context-length",
        "300",
        "--corrupted-answer",
        "echo delta charlie bravo alpha",
        "--prompt",
        "plain",
        "--max-new-tokens",
        "4",
    ]
    capsys.readouterr()
    assert (
        cli.main(common + ["--all-heads", "--scores", str(tmp_path / "det" / "results.json"), "--tail", "3", "--out", str(out)])
        == 0
    )
    printed = capsys.readouterr().out
    assert "head_out denoise (final position), top 8: 1-2 1.000" in printed
    assert "head_out noise (final position), top 8: 1-2 1.000" in printed
    assert "Spearman rho" in printed
    for name in ("head_out_heatmap.png", "pattern_heatmap.png", "resid_heatmap_denoise.png", "effect_vs_score.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "patching.json").read_text())
    assert saved["effects"]["head_out"]["denoise"][1][2] == pytest.approx(1.0, abs=1e-3)

    assert cli.main(common + ["--heads", "0-0", "1.1", "--kinds", "head_out", "--out", str(tmp_path / "two")]) == 0
    assert "top 2: 0-0 " in capsys.readouterr().out  # "1.1" is the older form, still read
    assert cli.main(common + ["--heads", "1-9", "--out", str(tmp_path / "bad")]) == 1
    assert "do not exist" in capsys.readouterr().err
    assert cli.main(common[:-6] + ["--corrupted-answer", "echo", "--all-heads", "--out", str(tmp_path / "bad")]) == 1
    assert "differ in token length" in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["masked", "real"])
def test_compress_prints_the_table_and_writes_curve_heatmaps_and_splits(inputs, capsys, cache):
    tmp_path, argv = inputs
    assert cli.main(argv + ["--out", str(tmp_path / "det")]) == 0
    argv = [a if a != "detect" else "compress" for a in argv if a not in ("--top", "3")]
    out = tmp_path / "kv"
    args = argv + [
        "--scores",
        str(tmp_path / "det" / "results.json"),
        "--full-fraction",
        "0.125",
        "--sink",
        "4",
        "--window",
        "8",
        "--random-seeds",
        "1",
        "--cache",
        cache,
        "--out",
        str(out),
    ]
    capsys.readouterr()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    rows = {
        tuple(line.split()[:2]): line.split() for line in printed.splitlines()[2:7]
    }  # method, full, kept, ratio, trials, recall
    assert float(rows[("full", "all")][5]) == 1.0 and float(rows[("retrieval", "0.125")][5]) == 1.0
    assert "retrieval-0.125 vs streaming-0.125" in printed
    for name in ("compression.json", "recall_vs_kv.png", "niah_heatmaps.png", "duo_attention/0.125/full_attention_heads.tsv"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "compression.json").read_text())["settings"]["cache"] == cache


def test_ablate_by_thresholds(inputs, capsys):
    tmp_path, argv = inputs
    assert cli.main(argv + ["--out", str(tmp_path / "det")]) == 0
    argv = [a if a != "detect" else "ablate" for a in argv if a not in ("--top", "3")]
    out = tmp_path / "thr"
    args = argv + [
        "--scores",
        str(tmp_path / "det" / "results.json"),
        "--thresholds",
        "0.05",
        "0.5",
        "--random-seeds",
        "1",
        "--out",
        str(out),
    ]
    capsys.readouterr()
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    # Only the planted head scores above 0: one head at either threshold, and masking it breaks retrieval.
    assert "threshold 0.05: 1 heads; recall with them masked" in printed and "threshold 0.5: 1 heads" in printed
    assert (out / "threshold_sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(args[:-2] + ["--thresholds", "0.99", "--top-k", "1", "--out", str(out)]) == 2  # one or the other


def test_detect_checkpoint_is_loaded_and_recorded(inputs, monkeypatch):
    tmp_path, argv = inputs
    loads = []
    monkeypatch.setattr(workflows, "load_model", lambda name, **kwargs: loads.append(kwargs) or build_planted_model())
    out = tmp_path / "step4000"
    assert cli.main(argv + ["--checkpoint", "4000", "--out", str(out)]) == 0
    assert loads[0]["checkpoint"] == 4000
    assert json.loads((out / "results.json").read_text())["settings"]["checkpoint"] == 4000
    assert cli.main(argv + ["--checkpoint", "4000", "--workers", "2", "--out", str(tmp_path / "ray")]) == 1


def test_atlas_prints_the_table_and_writes_figures(inputs, capsys):
    tmp_path, argv = inputs
    argv = [a if a != "detect" else "atlas" for a in argv if a not in ("--top", "3")]
    evaluate = f"--haystack {tmp_path / 'hay'} --needles {tmp_path / 'needles.jsonl'} --lengths 280 --depths 50"
    out = tmp_path / "atlas"
    args = argv + ["--evaluate", evaluate, "--head-fractions", "0.1", "--random-seeds", "1", "--window", "16"]
    args += ["--resamples", "20", "--out", str(out)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    table = printed.split("\nKV:")[0].splitlines()[2:]  # the recall table, before the Spearman table
    rows = {line.split()[0]: line.split() for line in table}
    assert float(rows["retrieval"][1]) == 0.0 and float(rows["query-focused"][1]) == 1.0  # top-1 masked
    kept = json.loads((out / "atlas.json").read_text())["kv"]
    kept = next(r["kv_kept"] for r in kept if r["method"] == "streaming")
    assert rows["streaming"][-1] == f"{kept:.0%}"  # the streaming row: its recall, then the cache it keeps
    # paired tests, a shared head set naming every method that chose it
    assert re.search(r"top-1 retrieval/\S+ vs random: ", printed) and "KV retrieval/" in printed
    for name in ("atlas.json", "recall_vs_k.png", "recall_at_kv.png", "agreement.png", "maps.png", "maps/razor.json"):
        assert (out / name).stat().st_size > 0
    # the evaluation grid shares the detection grid's needle: --heldout refuses it, before any model loads
    assert cli.main(args[:-1] + [str(tmp_path / "atlas2"), "--heldout"]) == 1
    assert "--heldout: the evaluation grid shares 1 of the ranking's own needles" in capsys.readouterr().err
    assert not (tmp_path / "atlas2").exists()
    assert cli.main(args[:-1] + [str(tmp_path / "atlas2"), "--other-haystack"]) == 1  # the same haystack, too
    assert "same_haystack" in capsys.readouterr().err
    assert cli.main(args[:-1] + [str(tmp_path / "atlas3"), "--evaluate=--lengths x"]) == 2


def test_compare_tells_which_of_two_masking_runs_loses_more_per_problem(tmp_path, capsys):
    cot, answer_only = tmp_path / "cot" / "ablation.json", tmp_path / "answer-only" / "ablation.json"
    arithmetic_run(cot, "cot", lambda i: i % 2 == 0)  # top-1 masked: 20 of 40 lost
    arithmetic_run(answer_only, "answer-only", lambda i: i % 10 != 0)  # 4 lost
    assert cli.main(["compare", str(cot), str(answer_only), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "cot drop top-1 vs answer-only drop top-1: +0.400" in printed and "-> a > b" in printed
    assert "cot drop random-1 vs answer-only drop random-1: +0.000" in printed
    saved = json.loads((tmp_path / "out" / "run_comparison.json").read_text())
    assert saved["runs"] == ["cot", "answer-only"] and len(saved["tests"]) == 2
    assert (tmp_path / "out" / "recall_vs_k.png").read_bytes()[:4] == b"\x89PNG"
    # a ranking is not a masking run
    ranking = str(Path(__file__).parent / "data" / "smollm2-135m-small.json")
    assert cli.main(["compare", str(cot), ranking, "--out", str(tmp_path / "bad")]) == 1
    assert "not a masking run" in capsys.readouterr().err
