"""End to end on a real model: SmolLM2-135M-Instruct from the offline catalogue, a small grid."""

import pytest

from rh_lens import BUILTIN_NEEDLES, detect, load_model, trial_grid
from rh_lens.execution.options import RunOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


def test_detection_on_smollm2_finds_retrieval_heads_deterministically(smollm2, tmp_path):
    trials = trial_grid(smollm2.tokenizer, BUILTIN_NEEDLES[1:], [600, 1800], [20, 80], max_tokens=smollm2.cfg.n_ctx)
    assert max(len(t.prompt_ids) for t in trials) <= 2000
    first = detect(smollm2, trials, tmp_path / "a", options=RunOptions(progress=False))
    second = detect(smollm2, trials, tmp_path / "b", options=RunOptions(progress=False))

    assert len(first.successful) >= 1, [t.response for t in first.trials]
    assert len(first.retrieval_heads(0.1)) >= 1
    assert first.ranking()[0][2] > 0.5  # the best head copies most of the answer
    assert [t.generated_ids for t in first.trials] == [t.generated_ids for t in second.trials]
    assert first.ranking(20) == second.ranking(20)
    # Sparsity, as in the paper: far from every head copies.
    assert first.fraction_above(0.1) < 0.25
