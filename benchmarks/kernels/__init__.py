"""Scoring-kernel benchmarks and the random paged cases they share with the tests."""
