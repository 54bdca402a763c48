"""Mini-benchmark: tiny trained Qwen2-VL base + LoRA experts on synthetic tasks, for the leaderboard and its gate."""
