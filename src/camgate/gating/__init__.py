"""The gate: a policy (:mod:`.policy`) judged on statistics of a results file (:mod:`.stats`) gives a
decision (:mod:`.decision`)."""
from ..io.results import ResultsError, read_results
from .decision import Decision, RuleResult, evaluate, gate
from .policy import DEFAULT_RULES, RULES, Policy, PolicyError, Rule, load_policy
from .stats import BaselineError, baseline_stats, class_stats, pair_baseline, road_stats

__all__ = ["BaselineError", "DEFAULT_RULES", "Decision", "Policy", "PolicyError", "RULES", "ResultsError", "Rule",
           "RuleResult", "baseline_stats", "class_stats", "evaluate", "gate", "load_policy", "pair_baseline",
           "read_results", "road_stats"]
