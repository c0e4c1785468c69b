"""Deployable entrypoint: one batch inference task (see prefect.yaml)."""

from batchyard.orchestration.flows import inference_flow

__all__ = ["inference_flow"]

if __name__ == "__main__":
    import sys

    inference_flow(task_name=sys.argv[1], targets=sys.argv[2] if len(sys.argv) > 2 else "targets.yaml")
