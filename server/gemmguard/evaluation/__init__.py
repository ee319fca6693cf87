"""Accuracy evaluations against a running gemmguard server (lm-eval, kernel swap)."""
