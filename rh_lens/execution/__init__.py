"""How runs are carried out: run options, resumable run directories, Ray workers, files."""

from rh_lens.execution.files import read_json, write_atomic, write_json
from rh_lens.execution.options import RunOptions
from rh_lens.execution.runs import InProcess, run_directory, run_trials, saved_trials

__all__ = ["RunOptions", "InProcess", "run_directory", "run_trials", "saved_trials", "read_json", "write_atomic", "write_json"]
