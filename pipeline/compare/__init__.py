"""The comparison of losses as the paper reports it (§5.2, Tables 1-4, Figs 2-8), plus the statistics it lacks.

Pure analysis of finished trainings, no training here: the inputs are a table of runs (one row per training, its
validation score and test metrics), a table of per-volume test metrics and the grid that produced them
(:mod:`pipeline.compare.data` states the columns). The stages:

- :mod:`pipeline.compare.selection`: the hyperparameter value per method chosen on the mean validation DSC over
  seeds (paper §5.1.2), and mean ± std over seeds;
- :mod:`pipeline.compare.statistics`: paired (seed, test volume) differences of the reference method against each
  other method, bootstrap intervals, Wilcoxon signed-rank tests, Holm's correction;
- :mod:`pipeline.compare.ranking`: sum-rank and mean of case-specific ranks (paper Fig. 3);
- :mod:`pipeline.compare.tables` and :mod:`pipeline.compare.figures`: the markdown tables and the PNG figures;
- :mod:`pipeline.compare.verdict`: the verdict paragraph generated from the statistics, and the protocol line;
- :mod:`pipeline.compare.report`: :func:`write_report`, the whole report folder.
"""

from pipeline.compare.report import write_report

__all__ = ["write_report"]
