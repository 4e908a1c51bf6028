"""Ways to find "the heads that matter", one file each behind one interface: each module's
`trial_scores(model, traced)`, from a model and traced trials
(`rh_lens.detection.trace.trace_trials`: one decoding pass serves every decode-time method)
to a [trial, layer, head] score, higher meaning more important; `head_map(name, model,
traced)` is a method's map as a `DetectionResult` (see `base`).

| name | reads | what it scores |
|---|---|---|
| retrieval | decoding | Wu et al.: argmax on the answer token being emitted |
| attention-mass | decoding | HeadKV: attention on the answer span's top-k keys, no token check |
| shifted-copy | decoding | the retrieval rule at each head's own copy offset |
| output | decoding | direct logit attribution to the answer tokens emitted |
| query-focused | prompt | QRHead: question-to-gold attention minus a null query's |
| razor | nothing | RazorAttention: echo + induction on random repeated tokens (the paper keeps a union: `razor`) |
| duo-gates | training | DuoAttention: gates mixing full and streaming attention, learned by distillation |
"""

from collections.abc import Sequence

from transformer_lens import HookedTransformer

from rh_lens.detection.methods import attention_mass, duo_gates, output, query_focused, razor, retrieval, shifted_copy
from rh_lens.detection.methods.base import TrialScores
from rh_lens.detection.methods.base import head_map as _head_map
from rh_lens.detection.methods.shifted_copy import copy_offsets
from rh_lens.detection.records import DetectionResult
from rh_lens.detection.trace import TracedTrial

METHODS: dict[str, TrialScores] = {
    "retrieval": retrieval.trial_scores,
    "attention-mass": attention_mass.trial_scores,
    "shifted-copy": shifted_copy.trial_scores,
    "output": output.trial_scores,
    "query-focused": query_focused.trial_scores,
    "razor": razor.trial_scores,
    "duo-gates": duo_gates.trial_scores,
}


def head_map(method: str, model: HookedTransformer, traced: Sequence[TracedTrial]) -> DetectionResult:
    """`method`'s head map on the traced trials (a name of METHODS)."""
    if method not in METHODS:
        raise KeyError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    return _head_map(method, METHODS[method], model, traced)


__all__ = ["METHODS", "TrialScores", "copy_offsets", "head_map"]
