"""The head-wise cache on a real model: SmolLM2-135M-Instruct's greedy tokens through the real
cache are those of the masking simulation, in both modes."""

import pytest

from rh_lens import BUILTIN_NEEDLES, load_model, trial_grid
from rh_lens.execution.options import RunOptions
from rh_lens.interventions.base import evaluate
from rh_lens.interventions.compression import KVCompression, random_policy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", device="cpu")


@pytest.mark.parametrize("decode_only", [False, True])
def test_the_real_cache_answers_as_the_simulation(smollm2, decode_only):
    trials = trial_grid(smollm2.tokenizer, BUILTIN_NEEDLES[:2], [700], [50], max_tokens=smollm2.cfg.n_ctx)
    options = RunOptions(max_new_tokens=12, progress=False)
    policy = random_policy(smollm2, 0.1, seed=0, sink=4, window=16)  # the window is far shorter than the prompt
    answers = {
        cache: [r.generated_ids for r in evaluate(smollm2, trials, KVCompression(policy, decode_only, cache), options=options)]
        for cache in ("real", "masked")
    }
    assert answers["real"] == answers["masked"]
    full = [r.generated_ids for r in evaluate(smollm2, trials, None, options=options)]
    assert full != answers["real"]  # the policy changes the answers: the comparison can fail
