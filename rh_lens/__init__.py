"""rh_lens: find, test and use retrieval heads (Wu et al., 2024) with TransformerLens.

The public API, by part (each subpackage lists its own in `__all__`):
- model: `load_model`, `greedy_decode`, `decode_prompts` (many prompts: shared prefixes, batches);
- tasks: `Grid`, `Needle`, `Trial`, `build_trial`, grading (`answer_trial`, `answer_trials`, `rouge1_recall`);
- detection: `detect`, `DetectionResult`, `load_results`, the score (`copy_scores`,
  `retrieval_scores`), probes (`razor_scores`, `repeat_attention`);
- execution: `RunOptions`, `run_trials`;
- interventions: `mask_heads`, `HeadMask`, `ablation_experiment`, `KVPolicy`,
  `KVCompression`, `compression_experiment`, `activation_patching`, `evaluate`,
  `run_conditions`;
- analysis: `analyze`, `compare`, `bootstrap`, ...;
- kv (`rh_lens.kv`, imported on demand: it registers an attention function with
  transformers): `HeadwiseCache` for plain transformers models, `policy_from_head_map`;
- front ends (`rh_lens.app`, not imported here: it draws figures): one workflow per command.
"""

__version__ = "0.4.0"

from rh_lens.analysis import (
    Analysis,
    Bootstrap,
    Comparison,
    analyze,
    bootstrap,
    compare,
    coverage,
    distractors,
    dynamic_activation,
    universality,
)
from rh_lens.detection import (
    DEFAULT_THRESHOLD,
    DetectionResult,
    TrialRecord,
    copy_events,
    copy_scores,
    detect,
    load_results,
    razor_scores,
    repeat_attention,
    retrieval_scores,
    run_trial,
    save_results,
)
from rh_lens.errors import InputError, ModelLoadError, ResultsFileError, RhLensError, RunDirectoryError, TrialError
from rh_lens.execution import RunOptions, run_trials
from rh_lens.heads import Head, KVHead
from rh_lens.interventions import (
    AblationResult,
    CompressionResult,
    Condition,
    HeadMask,
    Intervention,
    InterventionResult,
    KVCompression,
    KVPolicy,
    PatchingResult,
    ablation_experiment,
    activation_patching,
    compression_experiment,
    evaluate,
    evaluate_niah,
    export_duo_attention,
    head_means,
    mask_heads,
    patching_pair,
    retrieval_policy,
    run_conditions,
)
from rh_lens.model import CATALOGUE, Decoding, decode_prompts, greedy_decode, load_model
from rh_lens.tasks import (
    BUILTIN_NEEDLES,
    Answer,
    Grid,
    Needle,
    NiahRecord,
    Trial,
    answer_trial,
    answer_trials,
    build_trial,
    load_haystack,
    load_needles,
    rouge1_recall,
    trial_grid,
)

__all__ = [
    "AblationResult",
    "Analysis",
    "Answer",
    "BUILTIN_NEEDLES",
    "Bootstrap",
    "CATALOGUE",
    "Comparison",
    "CompressionResult",
    "Condition",
    "DEFAULT_THRESHOLD",
    "DetectionResult",
    "Grid",
    "Head",
    "HeadMask",
    "InputError",
    "Intervention",
    "InterventionResult",
    "KVCompression",
    "KVHead",
    "KVPolicy",
    "ModelLoadError",
    "Needle",
    "NiahRecord",
    "PatchingResult",
    "ResultsFileError",
    "RhLensError",
    "RunDirectoryError",
    "RunOptions",
    "Trial",
    "TrialError",
    "TrialRecord",
    "ablation_experiment",
    "activation_patching",
    "analyze",
    "answer_trial",
    "answer_trials",
    "bootstrap",
    "build_trial",
    "compare",
    "compression_experiment",
    "copy_events",
    "copy_scores",
    "coverage",
    "detect",
    "distractors",
    "dynamic_activation",
    "evaluate",
    "evaluate_niah",
    "export_duo_attention",
    "Decoding",
    "decode_prompts",
    "greedy_decode",
    "head_means",
    "load_haystack",
    "load_model",
    "load_needles",
    "load_results",
    "mask_heads",
    "patching_pair",
    "razor_scores",
    "repeat_attention",
    "retrieval_policy",
    "retrieval_scores",
    "rouge1_recall",
    "run_conditions",
    "run_trial",
    "run_trials",
    "save_results",
    "trial_grid",
    "universality",
]
