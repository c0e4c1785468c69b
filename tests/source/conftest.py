"""Source-side fixtures live in tests/conftest.py (shared with tests/sinks)."""
