"""Evaluation sets shipped with the package (GSM8K test, MATH500, AIME 2024) for offline benchmark runs."""
