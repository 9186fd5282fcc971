"""The load generator: send a workload to a target and measure both sides.

``run_workload(workload, target, RunOptions(...)) -> RunResult`` is the entry point
(``run``); ``client`` times one request; ``engines`` reads the engines' /metrics;
``ceiling`` computes what one unlimited cache would hit; ``summary`` turns records into
figures; ``cli`` is ``python -m loadtest run``.
"""

from loadtest.runner.run import RunOptions, RunResult, run_workload

__all__ = ["RunOptions", "RunResult", "run_workload"]
