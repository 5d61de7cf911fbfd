"""Evaluating structures (docs/architecture.md): readers of collections, one `ScoredStructure` per entry,
validity, matching (uniqueness, novelty, CSP), distribution distances and coverage, CHGNet relaxation on an
approximate hull, and the reports. Nothing here needs a language model.

>>> from crystallm.evaluation import EvaluationOptions, evaluate
>>> evaluate("mp20-bt/test", options=EvaluationOptions(limit=3, num_proc=1, progress=False))["entries"]
3
"""

from crystallm.evaluation.batch import EvaluationOptions, evaluate
from crystallm.evaluation.csp import CSPTask
from crystallm.evaluation.relaxation import StabilityTask
from crystallm.evaluation.scoring import ScoredStructure

__all__ = ["CSPTask", "EvaluationOptions", "ScoredStructure", "StabilityTask", "evaluate"]
