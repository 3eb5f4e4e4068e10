"""Task scores for teacher and student: BLiMP minimal pairs, answer fidelity, lm-eval-harness tasks.

- :mod:`.blimp`: whole-sentence log-probability on BLiMP's grammatical/ungrammatical pairs (bundled data);
- :mod:`.fidelity`: the teacher's and student's chat answers side by side, scored by the teacher's per-byte
  log-likelihood, ROUGE-L against the teacher's answer, and degeneration measures;
- :mod:`.lm_eval_adapter`: any lm-eval task (shipped offline tasks, local YAML, registry) in a child process;
- :mod:`.runner`: ``run_tasks``, what ``distillery eval --tasks`` calls.
"""

from .runner import parse_tasks, run_tasks, summary

__all__ = ["parse_tasks", "run_tasks", "summary"]
