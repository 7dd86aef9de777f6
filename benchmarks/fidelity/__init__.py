"""Fidelity benchmark: does ReFreeKV keep full-cache quality on real tasks, what does it save,
and how do fixed budgets compare (``python -m benchmarks.fidelity.run_fidelity --help``)."""
