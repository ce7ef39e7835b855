"""Evaluation: perplexity and agreement, lm-eval, the shipped stdlib task, reports and plots."""
