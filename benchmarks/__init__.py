"""Benchmark suites (task lists as data), paper reference numbers, the leaderboard and the main job."""
