"""Evaluation: the one accuracy pass, metrics, reports and plots."""
