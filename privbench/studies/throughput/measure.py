"""Page "Benchmark Results", worker side: one trainer run, timed."""

from privbench.studies.measuring import import_trainer_frameworks as import_frameworks
from privbench.studies.measuring import measure_trainer as measure

__all__ = ["import_frameworks", "measure"]
