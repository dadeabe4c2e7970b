"""Shared pytest setup. Every test runs in CI: there are no opt-in tests."""
