"""The corpus: the state that spans runs (see ARCHITECTURE.md, "The corpus").

| module | what |
|---|---|
| `keys.py` | stable partition keys: companies and fixed hash buckets (pure) |
| `store.py` | the scope's files under `<root>/_corpus/`: registry, key records, open runs, retry set, lease |
| `detect.py` | change detection: full read or changes only, per company; what to reconcile |
| `claims.py` | units other open runs of the scope hold |
| `prune.py` | the sinks follow the source: delete what the source no longer has |
| `lifecycle.py` | what a run does with the corpus when it selects, materializes and finishes |
| `status.py` | `batchyard assets`: every partition key's latest materialization and state now |
"""
