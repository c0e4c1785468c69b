"""batchyard: batch-first embeddings and LLM inference over MongoDB chunks."""

import os

# Polars allocates through jemalloc, which by default keeps freed pages for about 10 s: a run
# that plans and collects partition after partition would then hold the high-water mark of all
# of them. Returning freed pages at once keeps memory bounded by one partition (measured: 75 MB
# lower peak and 500 MB less retained per 100k-chunk partition, about 5% slower planning).
# jemalloc reads this when Polars is first imported, so it must be set before that.
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:0,muzzy_decay_ms:0")

__version__ = "0.1.0"
