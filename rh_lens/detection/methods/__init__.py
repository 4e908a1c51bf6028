"""Ways to find "the heads that matter", one file each behind one interface: a `Method` is
a module's `score(model, traced)`, from a model and traced trials
(`rh_lens.detection.trace.trace_trials`: one decoding pass serves every decode-time method)
to a [layer, head] score, higher meaning more important.

| name | reads | what it scores |
|---|---|---|
| retrieval | decoding | Wu et al.: argmax on the answer token being emitted |
| attention-mass | decoding | HeadKV: attention on the answer span's top-k keys, no token check |
| shifted-copy | decoding | the retrieval rule at each head's own copy offset |
| output | decoding | direct logit attribution to the answer tokens emitted |
| query-focused | prompt | QRHead: question-to-gold attention minus a null query's |
| razor | nothing | RazorAttention: echo + induction on random repeated tokens |
"""

from rh_lens.detection.methods import attention_mass, output, query_focused, razor, retrieval, shifted_copy
from rh_lens.detection.methods.base import Method, mean_over_successful
from rh_lens.detection.methods.shifted_copy import copy_offsets

METHODS: dict[str, Method] = {
    "retrieval": retrieval.score,
    "attention-mass": attention_mass.score,
    "shifted-copy": shifted_copy.score,
    "output": output.score,
    "query-focused": query_focused.score,
    "razor": razor.score,
}

__all__ = ["METHODS", "Method", "copy_offsets", "mean_over_successful"]
