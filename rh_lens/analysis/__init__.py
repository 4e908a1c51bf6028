"""What head maps say: dynamic activation, coverage, universality, comparisons, bootstrap intervals, the head atlas."""

from rh_lens.analysis.analyses import (
    Analysis,
    Comparison,
    analyze,
    compare,
    coverage,
    distractors,
    dynamic_activation,
    universality,
)
from rh_lens.analysis.atlas import Atlas, AtlasOptions, build_atlas
from rh_lens.analysis.statistics import Bootstrap, bootstrap

__all__ = [
    "Analysis",
    "Comparison",
    "analyze",
    "compare",
    "coverage",
    "distractors",
    "dynamic_activation",
    "universality",
    "Bootstrap",
    "bootstrap",
    "Atlas",
    "AtlasOptions",
    "build_atlas",
]
