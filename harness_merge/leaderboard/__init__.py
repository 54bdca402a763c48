"""Leaderboard: run a methods x tasks grid, store its results, gate on regressions."""
