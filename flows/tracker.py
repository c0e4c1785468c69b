"""Deployable entrypoints: the scheduled tracker (poll, collect, submit for every open run) and
`resume` (see prefect.yaml), with the task runner of the worker's environment (`deployable`)."""

from batchyard.orchestration import flows

tracker_flow = flows.deployable(flows.tracker_flow)
resume_flow = flows.deployable(flows.resume_flow)

__all__ = ["resume_flow", "tracker_flow"]

if __name__ == "__main__":
    tracker_flow()
