"""The local OpenAI-compatible Batch API server (`batchyard serve`).

Embedded default provider, test peer and self-hosted batch gateway in one. See
`batchyard.localapi.server` for the HTTP app and `batchyard.localapi.config` for its knobs.
"""
