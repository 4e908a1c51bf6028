"""Trials sharded on Ray: the same scores as one process, resumable under either executor,
and a real `ray start --head` cluster reached by address."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import planted  # noqa: E402
from planted import NEEDLE, build_planted_model, haystack_text  # noqa: E402

import rh_lens.detection.run as detection  # noqa: E402
from rh_lens.detection.run import detect  # noqa: E402
from rh_lens.execution.distributed import RayPool  # noqa: E402
from rh_lens.execution.options import RunOptions  # noqa: E402
from rh_lens.interventions.masking import evaluate_niah  # noqa: E402
from rh_lens.tasks.niah import build_trial, tokenize_haystack  # noqa: E402

model = build_planted_model()
haystack = tokenize_haystack(model.tokenizer, haystack_text(), 300)
trials = [build_trial(model.tokenizer, haystack, NEEDLE, length, depth) for length in (260, 300) for depth in (0, 50, 100)]


@pytest.fixture(scope="module")
def pool():
    ray.cloudpickle.register_pickle_by_value(planted)  # the workers cannot import tests/planted.py
    with RayPool("planted", workers=2, load=build_planted_model) as workers:
        yield workers
    ray.shutdown()


def test_two_workers_give_the_sequential_scores(pool):
    sequential = detect(model, trials, options=RunOptions(max_new_tokens=8, progress=False))
    sharded = detect(model, trials, executor=pool, options=RunOptions(max_new_tokens=8, progress=False))
    assert [t.key for t in sharded.trials] == [t.key for t in trials]  # trial order, whatever finished first
    assert [t.head_scores for t in sharded.trials] == [t.head_scores for t in sequential.trials]
    assert [t.generated_ids for t in sharded.trials] == [t.generated_ids for t in sequential.trials]
    masked = evaluate_niah(model, trials, heads=[(1, 2)], executor=pool, options=RunOptions(max_new_tokens=8, progress=False))
    assert [r.response for r in masked] == [
        r.response for r in evaluate_niah(model, trials, heads=[(1, 2)], options=RunOptions(max_new_tokens=8, progress=False))
    ]


def test_a_run_killed_half_way_resumes_under_the_other_executor(pool, tmp_path, monkeypatch):
    full = detect(model, trials, options=RunOptions(max_new_tokens=8, progress=False))
    real, calls = detection.score_trial, []

    def killed_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(detection, "score_trial", killed_after_three)
    with pytest.raises(KeyboardInterrupt):
        detect(model, trials, tmp_path / "a", options=RunOptions(max_new_tokens=8, progress=False))
    monkeypatch.setattr(detection, "score_trial", real)
    assert len(list((tmp_path / "a" / "trials").glob("*.json"))) == 3
    on_ray = detect(
        model, trials, tmp_path / "a", executor=pool, options=RunOptions(resume=True, max_new_tokens=8, progress=False)
    )
    assert [t.head_scores for t in on_ray.trials] == [t.head_scores for t in full.trials]

    # and the other way: half a run on Ray, the rest in this process
    detect(model, trials[:3], tmp_path / "b", executor=pool, options=RunOptions(max_new_tokens=8, progress=False))
    here = detect(model, trials, tmp_path / "b", options=RunOptions(resume=True, max_new_tokens=8, progress=False))
    assert [t.head_scores for t in here.trials] == [t.head_scores for t in full.trials]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_real_cluster_runs_a_smollm2_grid(tmp_path, capsys):
    """`ray start --head` on 127.0.0.1, then `rh-lens detect --ray-address` with one worker."""
    import rh_lens.app.cli as cli

    ray.shutdown()  # any local instance of the tests above; the command below connects to the cluster
    port = free_port()
    ray_cli = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    env_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    start = [
        ray_cli,
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={env_dir}",
    ]
    subprocess.run(start, check=True, capture_output=True, timeout=180)
    try:
        argv = [
            "detect",
            "--model",
            "smollm2-135m",
            "--needles",
            str(needles_file(tmp_path)),
            "--lengths",
            "600",
            "--depths",
            "50",
            "--max-new-tokens",
            "20",
            "--workers",
            "1",
            "--ray-address",
            f"127.0.0.1:{port}",
            "--out",
            str(tmp_path / "run"),
        ]
        assert cli.main(argv) == 0
        out = capsys.readouterr().out
        assert "1/1 trials retrieved the answer" in out
        assert len(list((tmp_path / "run" / "trials").glob("*.json"))) == 1
    finally:
        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(env_dir, ignore_errors=True)


def needles_file(tmp_path: Path) -> Path:
    from rh_lens.tasks.needles import BUILTIN_NEEDLES

    path = tmp_path / "needles.jsonl"
    path.write_text(json.dumps(BUILTIN_NEEDLES[1].__dict__) + "\n")
    return path
