"""Deployable entrypoint: the scheduled tracker (poll, collect, submit for every open run)."""

from batchyard.orchestration.flows import resume_flow, tracker_flow

__all__ = ["resume_flow", "tracker_flow"]

if __name__ == "__main__":
    tracker_flow()
