"""The local OpenAI-compatible Batch API server (`batchyard serve`).

Embedded default provider, test peer and self-hosted batch gateway in one. Modules:
`config` (knobs and faults), `runner` (`LocalServer`, `serve`), `server` (the FastAPI app),
`sync` (the synchronous endpoints of the real-time lane, their faults and call record),
`worker` (batch lifecycle), `progress` (resumable per-batch progress files), `store`
(persistent state), `validation` (input-file checks), `executors` (request executors),
`vectors` (`hash_embedding`, vector encodings), `completions` (simulated chat/responses),
`schema_gen` (schema-valid values), `faults`, `shapes` (OpenAI wire objects), `texts`.
Multipart uploads are parsed by Starlette (python-multipart).
"""
