"""Finding retrieval heads: the paper's score, detection runs, their records, adaptive stopping, data-free probes,
and the other head-finding methods (`methods`, from one traced decoding: `trace`)."""

from rh_lens.detection.adaptive import shuffled, stable_after, top_k_indices, top_k_set
from rh_lens.detection.methods import METHODS as HEAD_METHODS
from rh_lens.detection.methods import head_map
from rh_lens.detection.probes import razor_scores, repeat_attention
from rh_lens.detection.records import DetectionResult, TrialRecord, load_results, save_results
from rh_lens.detection.run import decode_and_score, detect, run_trial
from rh_lens.detection.scoring import DEFAULT_THRESHOLD, copied_offsets, copy_events, copy_scores, event_scores, retrieval_scores
from rh_lens.detection.trace import HeadTrace, TracedTrial, trace_trials

__all__ = [
    "DEFAULT_THRESHOLD",
    "copied_offsets",
    "copy_events",
    "copy_scores",
    "event_scores",
    "retrieval_scores",
    "detect",
    "run_trial",
    "decode_and_score",
    "DetectionResult",
    "TrialRecord",
    "load_results",
    "save_results",
    "shuffled",
    "stable_after",
    "top_k_indices",
    "top_k_set",
    "razor_scores",
    "repeat_attention",
    "HEAD_METHODS",
    "head_map",
    "HeadTrace",
    "TracedTrial",
    "trace_trials",
]
