"""batchyard: batch-first embeddings and LLM inference over MongoDB chunks."""

__version__ = "0.1.0"
