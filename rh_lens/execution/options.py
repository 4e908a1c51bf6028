"""How a run is carried out, as one value: where the model runs, how it decodes, where the
trials run and what happens to a run directory. The task (which trials) is a `Grid`; what
is measured is each command's own arguments; everything else is a `RunOptions`."""

from __future__ import annotations

from dataclasses import dataclass

from rh_lens.errors import InputError
from rh_lens.model.generation import MAX_NEW_TOKENS, Decoding


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Options every trial-running command shares.

    device, dtype, verify_cache: how the model is loaded (`load_model`);
    max_new_tokens, chunk_size: greedy decoding budget and prefill chunk (None: chosen per model);
    batch_size, share_prefix: trials decoded together (None: chosen for the device and the
    prompts' length) and prefill from the shared prompt prefix of the trial before (see
    `rh_lens.model.generation.Decoding`; the records are those of one trial at a time);
    merge_conditions: conditions that decode from one prefill decode in one batch, each row
    under its own condition's hooks (False: one condition after another; same records);
    score_heads: an experiment's records also carry every head's copy score on each trial (the
    retrieval score's per-trial term; decode steps then record where each head looks);
    resume, overwrite: continue the run in the output directory / replace an earlier one there;
    progress: progress bars;
    workers, ray_address: run the trials on that many Ray workers (a local Ray instance, or
    the cluster at `ray_address`), each holding the model."""

    device: str | None = None
    dtype: str | None = None
    verify_cache: bool = False
    max_new_tokens: int = MAX_NEW_TOKENS
    chunk_size: int | None = None
    batch_size: int | None = None
    share_prefix: bool = True
    merge_conditions: bool = True
    score_heads: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    workers: int | None = None
    ray_address: str | None = None

    def __post_init__(self):
        _ = self.decoding  # refuses a bad token budget, chunk or batch size
        if self.resume and self.overwrite:
            raise InputError("resume and overwrite exclude each other: continue the run, or replace it")

    @property
    def decoding(self) -> Decoding:
        """How the trials' prompts are decoded."""
        return Decoding(
            max_new_tokens=self.max_new_tokens,
            chunk_size=self.chunk_size,
            batch_size=self.batch_size,
            share_prefix=self.share_prefix,
            merge_conditions=self.merge_conditions,
        )
