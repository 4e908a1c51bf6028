"""Bad input and concurrent use, as a new user meets them: every case either runs correctly
or stops with one line on stderr and a non-zero exit status; no file outside --out is
touched, no user file inside it is replaced, nothing is silently wrong.

The command-line cases go through `rh_lens.app.cli.main` (and, for concurrency, two real
processes) on the planted-head model; the model-cache cases use a tiny random model.
"""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from planted import NEEDLE, build_planted_model, haystack_text

import rh_lens.app.cli as cli
import rh_lens.detection.run as detection

HERE = Path(__file__).resolve().parent
planted = build_planted_model()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """A haystack directory, a one-needle file and the detect arguments (4 short trials)."""
    loader = sys.modules.get("rh_lens.app.workflows", cli)
    calls = []
    monkeypatch.setattr(loader, "load_model", lambda name, **kwargs: calls.append(name) or planted)
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "text.txt").write_text(haystack_text())
    needles = tmp_path / "needles.jsonl"
    needles.write_text(json.dumps(NEEDLE.__dict__) + "\n")
    argv = [
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
    ]
    return tmp_path, argv, calls


def run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def messages(err: str) -> list[str]:
    """The lines of stderr that are not progress bars."""
    return [line for line in err.split("\n") if line.strip() and "\r" not in line and "%|" not in line]


def one_line_error(code: int, err: str) -> None:
    assert code != 0
    assert len(messages(err)) == 1 and "Traceback" not in err, err


# --- silent wrong results and data loss ------------------------------------------------


def test_two_processes_into_one_directory_the_second_is_refused(tmp_path):
    (tmp_path / "hay").mkdir()
    (tmp_path / "hay" / "text.txt").write_text(haystack_text())
    needles = tmp_path / "needles.jsonl"
    needles.write_text(json.dumps(NEEDLE.__dict__) + "\n")
    out = tmp_path / "o"
    argv = [
        sys.executable,
        str(HERE / "planted_cli.py"),
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
        "--out",
        str(out),
    ]
    release = tmp_path / "release"  # the first run's trials wait for it: it holds the directory until then
    env = {**os.environ, "PLANTED_HOLD_UNTIL": str(release), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(argv + ["--prompt", "auto"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "run.json").exists():  # the first run holds the directory and is running trials
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        second = subprocess.run(argv + ["--prompt", "plain"], env=env, capture_output=True, text=True, timeout=120)
    finally:
        release.touch()
    assert second.returncode == 1
    assert second.stderr.strip().endswith("is in use by another rh-lens run; wait for it to finish or choose another --out")
    assert second.stderr.count("\n") == 1
    assert first.wait(timeout=120) == 0
    assert json.loads((out / "run.json").read_text())["prompt"] == "auto"
    assert len(list((out / "trials").glob("*.json"))) == 4


@pytest.mark.parametrize(
    "option, value",
    [
        ("--chunk-size", "-5"),
        ("--chunk-size", "0"),
        ("--max-new-tokens", "0"),
        ("--threshold", "nan"),
        ("--threshold", "1.5"),
        ("--threshold", "-0.1"),
        ("--threshold", "inf"),
        ("--lengths", "0"),
        ("--lengths", "-100"),
        ("--depths", "-5"),
        ("--depths", "150"),
        ("--depths", "50.5"),
        ("--top", "0"),
    ],
)
def test_bad_numbers_fail_at_parse_time(setup, capsys, option, value):
    tmp_path, argv, calls = setup
    code, _, err = run(argv + [option, value, "--out", tmp_path / "o"], capsys)
    one_line_error(code, err)
    assert code == 2 and option in err
    assert calls == [] and not (tmp_path / "o").exists()


def test_chunk_size_is_recorded_in_the_settings(setup, capsys):
    tmp_path, argv, _ = setup
    assert run(argv + ["--chunk-size", "16", "--out", tmp_path / "o"], capsys)[0] == 0
    assert json.loads((tmp_path / "o" / "run.json").read_text())["chunk_size"] == 16


def test_resume_after_the_haystack_changed_is_refused(setup, capsys):
    tmp_path, argv, _ = setup
    assert run(argv + ["--out", tmp_path / "o"], capsys)[0] == 0
    (tmp_path / "hay" / "text.txt").write_text(haystack_text(seed=1))
    code, _, err = run(argv + ["--out", tmp_path / "o", "--resume"], capsys)
    one_line_error(code, err)
    assert "settings differ" in err and "haystack_sha256" in err


def test_resume_refuses_a_trial_saved_from_another_prompt(setup, capsys):
    """Same settings, but a saved trial's prompt is not the one this run would build (as
    after a tokenizer change): the trial is named."""
    tmp_path, argv, _ = setup
    assert run(argv + ["--out", tmp_path / "o"], capsys)[0] == 0
    saved = sorted((tmp_path / "o" / "trials").glob("*.json"))[1]
    record = json.loads(saved.read_text())
    record["prompt_sha256"] = "0" * 64
    saved.write_text(json.dumps(record))
    code, _, err = run(argv + ["--out", tmp_path / "o", "--resume"], capsys)
    one_line_error(code, err)
    assert f"trial {record['key']} was run on another prompt" in err


@pytest.mark.parametrize("name", ["results.json", "run.json", "head_scores.json", "notes.txt"])
def test_a_fresh_run_never_replaces_a_users_file(setup, capsys, name):
    tmp_path, argv, calls = setup
    out = tmp_path / "o"
    out.mkdir()
    (out / name).write_text("my own file")
    code, _, err = run(argv + ["--out", out], capsys)
    one_line_error(code, err)
    assert "is not empty" in err and "--overwrite" in err
    assert (out / name).read_text() == "my own file" and calls == []


def test_overwrite_replaces_a_symlink_and_never_writes_through_it(setup, capsys):
    tmp_path, argv, _ = setup
    out, outside = tmp_path / "o", tmp_path / "precious.png"
    out.mkdir()
    outside.write_text("not to be touched")
    (out / "heatmap.png").symlink_to(outside)
    (out / "results.json").symlink_to(outside)
    assert run(argv + ["--out", out], capsys)[0] == 1  # not empty
    assert run(argv + ["--out", out, "--overwrite"], capsys)[0] == 0
    assert outside.read_text() == "not to be touched"
    assert not (out / "heatmap.png").is_symlink() and (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "results.json").read_text())["format"] == "rh_lens.detection/1"


def test_outputs_have_normal_file_modes(setup, capsys):
    tmp_path, argv, _ = setup
    old = os.umask(0o022)
    try:
        assert run(argv + ["--out", tmp_path / "o"], capsys)[0] == 0
    finally:
        os.umask(old)
    for name in ("results.json", "head_scores.json", "heatmap.png", "run.json"):
        assert stat.S_IMODE((tmp_path / "o" / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(next((tmp_path / "o" / "trials").glob("*.json")).stat().st_mode) == 0o644


# --- one line, never a traceback --------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ("[1, 2, 3]", "a JSON list, expected an object"),
        ('"needle"', "a JSON str, expected an object"),
        ('{"needle": 5, "question": "q?", "real_needle": "x"}', "needle must be non-empty text"),
        ('{"needle": "a b c.", "question": ["q"], "real_needle": "b"}', "question must be non-empty text"),
        ('{"needle": "a b c.", "question": "q?"}', "missing real_needle"),
        ('{"needle": "a b c.", "question": "q?", "real_needle": "zzz"}', "is not part of needle"),
        ('{"needle": "a b c.", "question": "q?", "real_needle": "b"', "not JSON"),
    ],
)
def test_bad_needle_lines_name_the_file_and_line(setup, capsys, line, expected):
    tmp_path, argv, calls = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(NEEDLE.__dict__) + "\n" + line + "\n")
    argv[argv.index("--needles") + 1] = str(bad)
    code, _, err = run(argv + ["--out", tmp_path / "o"], capsys)
    one_line_error(code, err)
    assert f"{bad}:2:" in err and expected in err and calls == []


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"format": "rh_lens.detection/1", "model": "m"}', "damaged results file"),
        (
            '{"format": "rh_lens.detection/1", "model": "m", "n_layers": 1, "n_heads": 1, "threshold": 0.1, "trials": [{"key": "x"}]}',
            "damaged results file",
        ),
        (
            '{"format": "rh_lens.detection/1", "model": "m", "n_layers": 1, "n_heads": 1, "threshold": 0.1, "trials": [{"key": "x", '
            '"context_length": 1, "depth": 1, "needle_id": "n", "haystack": "h", "answer": "a", "generated_ids": [], "response": "a", '
            '"rouge_recall": 1.0, "success": true, "answer_span": [0, 1], "head_scores": [[1.0]], "surprise": 1}]}',
            "damaged results file",
        ),
        (
            '{"format": "rh_lens.detection/1", "model": "m", "n_layers": 2, "n_heads": 1, "threshold": 0.1, "trials": [{"key": "x", '
            '"context_length": 1, "depth": 1, "needle_id": "n", "haystack": "h", "answer": "a", "generated_ids": [], "response": "a", '
            '"rouge_recall": 1.0, "success": true, "answer_span": [0, 1], "head_scores": [[1.0]]}]}',
            "another shape",
        ),
        ('{"format": "rh_lens.detection/1", "model": "m", "n_la', "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "neither an rh_lens results file"),
        (None, "is a directory"),
        ("missing", "no such file"),
    ],
)
@pytest.mark.parametrize("command", ["show", "analyze", "compare"])
def test_bad_results_files_name_the_file(tmp_path, capsys, command, content, expected):
    path = tmp_path / "results.json"
    if content is None:
        path.mkdir()
    elif content != "missing":
        path.write_text(content)
    argv = {
        "show": ["show", path],
        "analyze": ["analyze", path, "--out", tmp_path / "o"],
        "compare": ["compare", path, path, "--out", tmp_path / "o"],
    }[command]
    code, _, err = run(argv, capsys)
    one_line_error(code, err)
    assert str(path) in err and expected in err


def test_unwritable_output_is_one_line(setup, capsys, tmp_path):
    _, argv, calls = setup
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(argv + ["--out", blocker / "out"], capsys)  # a directory inside a file
    one_line_error(code, err)
    assert f"cannot write to {blocker / 'out'}" in err and calls == []


def test_read_only_file_system_is_one_line(setup, capsys, monkeypatch):
    """What EROFS (or a full disk) does to the first output written after the run started."""
    tmp_path, argv, _ = setup
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).endswith(".tmp") and flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    code, _, err = run(argv + ["--out", tmp_path / "o"], capsys)
    one_line_error(code, err)
    assert "Read-only file system" in err


def test_ctrl_c_says_what_is_saved_and_how_to_resume(setup, capsys, monkeypatch):
    tmp_path, argv, _ = setup
    real, calls = detection.score_trial, []

    def interrupted_third(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(detection, "score_trial", interrupted_third)
    code, _, err = run(argv + ["--out", tmp_path / "o"], capsys)
    (message,) = messages(err)
    assert code == 130 and "Traceback" not in err
    assert message.startswith("rh-lens: interrupted; 2 finished trials saved in")
    assert message.endswith(f"--out {tmp_path / 'o'} --resume")
    monkeypatch.setattr(detection, "score_trial", real)
    assert run(argv + ["--out", tmp_path / "o", "--resume"], capsys)[0] == 0


def test_resume_without_run_json_says_it_is_gone(setup, capsys):
    tmp_path, argv, _ = setup
    assert run(argv + ["--out", tmp_path / "o"], capsys)[0] == 0
    (tmp_path / "o" / "run.json").unlink()
    code, _, err = run(argv + ["--out", tmp_path / "o", "--resume"], capsys)
    one_line_error(code, err)
    assert "its run.json is gone" in err and "--overwrite" in err


def test_compare_of_two_models_warns_and_runs(tmp_path, capsys):
    for name, scores in (("a", [[0.9, 0.1]]), ("b", [[0.8, 0.3]])):
        (tmp_path / f"{name}.json").write_text(json.dumps({f"0-{h}": [scores[0][h]] for h in range(2)}))
    code, out, err = run(["compare", tmp_path / "a.json", tmp_path / "b.json", "--out", tmp_path / "o"], capsys)
    assert code == 0 and "Pearson" in out
    assert err.startswith("rh-lens: warning: a and b are results of different models")


def test_bad_haystack_fails_before_the_model_loads(setup, capsys):
    tmp_path, argv, calls = setup
    argv[argv.index("--haystack") + 1] = str(tmp_path / "no-such-dir")
    code, _, err = run(argv + ["--out", tmp_path / "o"], capsys)
    one_line_error(code, err)
    assert "no-such-dir" in err and calls == []


# --- the model cache --------------------------------------------------------------------


@pytest.fixture
def cached_tiny(tmp_path, monkeypatch):
    """A tiny random Llama placed in the cache as if it were the catalogue's smollm2-135m."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from rh_lens.model.loading import load_model

    monkeypatch.setenv("RH_LENS_CACHE", str(tmp_path / "cache"))
    target = tmp_path / "cache" / "models" / "smollm2-135m"
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(target)
    backend = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(32)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="w1").save_pretrained(target)
    load_model("smollm2-135m", device="cpu")  # the first load records the manifest
    assert (target / "rh_lens_manifest.json").is_file()
    return target


def test_truncated_cached_weights_are_damage_with_the_fix(cached_tiny):
    from rh_lens.errors import ModelLoadError
    from rh_lens.model.loading import load_model

    weights = cached_tiny / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=r"is damaged \(model.safetensors has \d+ bytes, \d+ expected\); delete") as info:
        load_model("smollm2-135m", device="cpu")
    assert f"rm -r '{cached_tiny}'" in str(info.value) and "\n" not in str(info.value)
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"model.safetensors is missing"):
        load_model("smollm2-135m", device="cpu")


def test_overwritten_cached_weights_are_caught_by_verify_cache(cached_tiny):
    from rh_lens.errors import ModelLoadError
    from rh_lens.model.loading import load_model

    weights = cached_tiny / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:] = bytes(64)  # same size, other bytes: inside the last tensor
    weights.write_bytes(bytes(data))
    load_model("smollm2-135m", device="cpu")  # the size check alone cannot see it
    with pytest.raises(ModelLoadError, match=r"model.safetensors does not match its recorded sha256"):
        load_model("smollm2-135m", device="cpu", verify_cache=True)


def test_gguf_with_a_truncated_header_is_one_line(tmp_path, monkeypatch):
    from rh_lens.errors import ModelLoadError
    from rh_lens.model.loading import load_model

    monkeypatch.setenv("RH_LENS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00\x05")  # the magic and version, then nothing
    with pytest.raises(ModelLoadError, match=r"cannot read model.gguf as a GGUF model") as info:
        load_model(str(bad), device="cpu")
    assert "\n" not in str(info.value)
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # no half-built cache left


# --- property: any needle file and numbers either run or fail in one line -------------------

text = st.text(st.sampled_from('alpha bravo charlie delta echo river stone .?"\\{}[]:,é\n'), max_size=40)
needle_line = st.one_of(
    st.just(json.dumps(NEEDLE.__dict__)),
    st.fixed_dictionaries({"needle": text, "question": text, "real_needle": text}).map(json.dumps),
    st.dictionaries(st.sampled_from(["needle", "question", "real_needle", "x"]), st.one_of(text, st.integers(), st.none())).map(
        json.dumps
    ),
    st.lists(st.integers(), max_size=3).map(json.dumps),
    text,
)
number = st.one_of(st.integers(-3, 400).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr), text)


def mostly(valid, invalid=number):
    """`valid` about 7 times in 8, so that whole runs happen too, not only parse errors."""
    return st.integers(0, 7).flatmap(lambda i: invalid if i == 0 else valid)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    lines=mostly(st.just([json.dumps(NEEDLE.__dict__)]), st.lists(needle_line, max_size=3)),
    length=mostly(st.integers(240, 300).map(str)),  # the planted model's context is 256 tokens
    depth=mostly(st.integers(0, 100).map(str)),
    chunk=mostly(st.integers(16, 64).map(str)),
    tokens=mostly(st.integers(1, 6).map(str), st.one_of(st.integers(-2, 0).map(str), text)),
    threshold=mostly(st.floats(0, 1).map(repr)),
)
def test_any_needle_file_and_numbers_run_or_fail_in_one_line(setup, capsys, lines, length, depth, chunk, tokens, threshold):
    tmp_path, argv, _ = setup
    needles = tmp_path / "fuzz.jsonl"
    needles.write_text("\n".join(lines))
    argv = argv[: argv.index("--needles") + 1] + [
        str(needles),
        "--lengths",
        length,
        "--depths",
        depth,
        "--chunk-size",
        chunk,
        "--max-new-tokens",
        tokens,
        "--threshold",
        threshold,
        "--overwrite",
    ]
    code, out, err = run(argv + ["--out", tmp_path / "fuzz"], capsys)
    event(f"exit status {code}")
    if code == 0:
        assert "trials retrieved the answer" in out
        assert math.isfinite(float(threshold)) and 0 <= float(threshold) <= 1
    else:
        one_line_error(code, err)
