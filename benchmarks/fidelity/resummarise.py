"""A finished run's summaries computed again from its own per-sample scores, under the current
summary rules (which tasks count, the intervals); the tasks, samples, machine and iso-budget
baselines stay as they were run.

    python -m benchmarks.fidelity.resummarise RESULTS/fidelity_stats-long_test.json

Rewrites the ``.json`` and ``.md`` (and plots) in place. A run that reported a policy chosen
before it (``--chosen``) reports the same one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.fidelity import policies as pol
from benchmarks.fidelity.report import write_result
from benchmarks.fidelity.run_fidelity import CHOSEN_RULE, summarise
from benchmarks.fidelity.summary import GOAL, GOAL_TEXT


def resummarise(path: Path) -> dict:
    result = json.loads(path.read_text(encoding="utf-8"))
    fixed = [entry["fixed"] for entry in result.get("iso_budget", {}).values()]
    policies = pol.select(pol.full_grid(), list(dict.fromkeys(result["policies"] + fixed)))
    previous = result.get("summary", {})
    chosen = previous["policy"] if previous.get("rule") == CHOSEN_RULE else None
    result["goal"] = {**GOAL, "text": GOAL_TEXT}
    summarise(result, policies, chosen)
    write_result(result, path.parent, path.name.removesuffix(".json"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="fidelity result .json files")
    args = parser.parse_args()
    for path in args.results:
        summary = resummarise(path)["summary"]
        print(f"{path}: {summary['policy']} mean {summary['mean_rel_change']}, "
              f"worst {summary['worst_rel_change']} ({summary['worst_task']}), "
              f"left out {summary['excluded_tasks']}")


if __name__ == "__main__":
    main()
