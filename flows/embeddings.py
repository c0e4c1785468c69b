"""Deployable entrypoint: batch embeddings (see prefect.yaml)."""

from batchyard.orchestration.flows import embeddings_flow

__all__ = ["embeddings_flow"]

if __name__ == "__main__":
    import sys

    embeddings_flow(targets=sys.argv[1] if len(sys.argv) > 1 else "targets.yaml")
