"""Front ends: one workflow function per command (what the command line, experiments/ and
notebooks run), tables and figures, the rh-lens command line."""

from rh_lens.app.reports import (
    format_ablation,
    format_analysis,
    format_comparison,
    format_compression,
    format_patching,
    format_ranking,
)
from rh_lens.app.workflows import ablate_grid, analyze_file, compare_files, compress_grid, detect_grid, patch_needle

__all__ = [
    "ablate_grid",
    "analyze_file",
    "compare_files",
    "compress_grid",
    "detect_grid",
    "patch_needle",
    "format_ablation",
    "format_analysis",
    "format_comparison",
    "format_compression",
    "format_patching",
    "format_ranking",
]
