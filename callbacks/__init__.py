"""Lightning callbacks of lit_sapo, installed as ``lit_sapo.callbacks``.

Use them from YAML: ``trainer.callbacks: [{class_path: lit_sapo.callbacks.EntropyMonitor}]``.
"""

from lit_sapo.callbacks.checkpoint import RolloutCheckpoint
from lit_sapo.callbacks.collapse import CollapseWatch
from lit_sapo.callbacks.evaluation import BenchmarkEvaluation
from lit_sapo.callbacks.monitors import EntropyMonitor, ImportanceRatioMonitor
from lit_sapo.callbacks.samples import RolloutSamples
from lit_sapo.callbacks.progress import RolloutProgressBar
from lit_sapo.callbacks.summary import RunSummary

__all__ = ["BenchmarkEvaluation", "EntropyMonitor", "ImportanceRatioMonitor", "RolloutSamples", "RolloutProgressBar", "RunSummary",
           "RolloutCheckpoint", "CollapseWatch"]
