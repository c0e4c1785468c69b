"""Deployable entrypoint: batch embeddings (see prefect.yaml).

The flow gets the task runner of the worker's environment (`deployable`), e.g.
`BATCHYARD_ORCHESTRATION__TASK_RUNNER=dask`.
"""

from batchyard.orchestration import flows

embeddings_flow = flows.deployable(flows.embeddings_flow)

__all__ = ["embeddings_flow"]

if __name__ == "__main__":
    import sys

    embeddings_flow(targets=sys.argv[1] if len(sys.argv) > 1 else "targets.yaml")
