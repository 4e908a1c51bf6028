"""Results files of runs made up for tests that read them back (tabulation, comparison)."""

import json
from pathlib import Path

from rh_lens.interventions.base import Condition
from rh_lens.interventions.masking import AblationResult
from rh_lens.tasks.grading import NiahRecord


def arithmetic_run(path: Path, mode: str, top_right) -> None:
    """An ablation.json of 40 problems asked in `mode`: all right unmasked and under random-1,
    right under top-1 where `top_right(i)`."""

    def records(right):
        return [
            NiahRecord(
                key=f"{mode}-{i}",
                context_length=1000,
                depth=25,
                needle_id=f"problem-{i}",
                haystack=f"ruler-essays-{mode}",
                answer=str(i),
                generated_ids=[],
                response="",
                rouge_recall=float(right(i)),
                success=bool(right(i)),
                outcome="retrieved" if right(i) else "absent",
            )
            for i in range(40)
        ]

    conditions = [
        Condition("none", None, "none", {"kind": "none", "k": 0}, records(lambda i: True)),
        Condition("top-1", None, "top-1", {"kind": "top", "k": 1}, records(top_right)),
        Condition("random-1-seed0", None, "random-1", {"kind": "random", "k": 1, "seed": 0}, records(lambda i: True)),
    ]
    path.parent.mkdir(parents=True)
    settings = {"task": "arithmetic", "mode": mode}
    path.write_text(json.dumps(AblationResult("ablation", "m", conditions, settings).to_json()))
