"""What a model is asked: needle-in-a-haystack trials, questions about real documents (SQuAD,
HotpotQA), the synthetic training task, and grading an answer. Every needle, haystack and
corpus is loaded in `data` (built on `needles` and `needle_bank`), which no task module
imports back."""

from rh_lens.tasks.data import TASKS, Corpus, Question, load_corpus, load_haystack, load_needles
from rh_lens.tasks.documents import QAGrid, build_document_trial, select_questions
from rh_lens.tasks.grading import (
    RESPONSE_CLASSES,
    SUCCESS_RECALL,
    Answer,
    NiahRecord,
    answer_trial,
    answer_trials,
    outcome,
    recall_grid,
    response_class,
    rouge1_recall,
)
from rh_lens.tasks.needle_bank import ANSWER_KINDS, NEEDLE_BANK, NEEDLE_SPLITS
from rh_lens.tasks.needles import BUILTIN_LONG_NEEDLES, BUILTIN_NEEDLES, Needle
from rh_lens.tasks.niah import DEFAULT_DEPTHS, DEFAULT_LENGTHS, PROMPTS, Grid, Trial, build_trial, tokenize_haystack, trial_grid
from rh_lens.tasks.splits import CHECKS, check_split, held_out, shared_items, split_of
from rh_lens.tasks.synthetic import Batches, SyntheticTask, tiny_model, train_step

__all__ = [
    "BUILTIN_LONG_NEEDLES",
    "BUILTIN_NEEDLES",
    "DEFAULT_DEPTHS",
    "DEFAULT_LENGTHS",
    "PROMPTS",
    "Grid",
    "Needle",
    "Trial",
    "build_trial",
    "load_haystack",
    "load_needles",
    "tokenize_haystack",
    "trial_grid",
    "RESPONSE_CLASSES",
    "SUCCESS_RECALL",
    "Answer",
    "NiahRecord",
    "answer_trial",
    "answer_trials",
    "outcome",
    "recall_grid",
    "response_class",
    "rouge1_recall",
    "TASKS",
    "Corpus",
    "QAGrid",
    "Question",
    "build_document_trial",
    "load_corpus",
    "select_questions",
    "ANSWER_KINDS",
    "NEEDLE_BANK",
    "NEEDLE_SPLITS",
    "CHECKS",
    "check_split",
    "held_out",
    "shared_items",
    "split_of",
    "Batches",
    "SyntheticTask",
    "tiny_model",
    "train_step",
]
