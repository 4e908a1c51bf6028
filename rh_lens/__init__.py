"""rh_lens: find, test and use retrieval heads (Wu et al., 2024) with TransformerLens."""

__version__ = "0.1.0"

from .detection import answer_trial, detect, run_trial
from .errors import InputError, ModelLoadError, RhLensError, TrialError
from .generation import greedy_decode
from .heads import Head
from .models import CATALOGUE, load_model
from .niah import BUILTIN_NEEDLES, Grid, Needle, Trial, build_trial, load_haystack, load_needles, trial_grid
from .results import DetectionResult, TrialRecord, load_results, save_results
from .scoring import copy_events, copy_scores, retrieval_scores, rouge1_recall

__all__ = [
    "BUILTIN_NEEDLES",
    "CATALOGUE",
    "DetectionResult",
    "Grid",
    "Head",
    "InputError",
    "ModelLoadError",
    "Needle",
    "RhLensError",
    "Trial",
    "TrialError",
    "TrialRecord",
    "answer_trial",
    "build_trial",
    "copy_events",
    "copy_scores",
    "detect",
    "greedy_decode",
    "load_haystack",
    "load_model",
    "load_needles",
    "load_results",
    "retrieval_scores",
    "rouge1_recall",
    "run_trial",
    "save_results",
    "trial_grid",
]
