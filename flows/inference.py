"""Deployable entrypoint: one batch inference task (see prefect.yaml).

The flow gets the task runner of the worker's environment (`deployable`), e.g.
`BATCHYARD_ORCHESTRATION__TASK_RUNNER=dask`.
"""

from batchyard.orchestration import flows

inference_flow = flows.deployable(flows.inference_flow)

__all__ = ["inference_flow"]

if __name__ == "__main__":
    import sys

    inference_flow(task_name=sys.argv[1], targets=sys.argv[2] if len(sys.argv) > 2 else "targets.yaml")
