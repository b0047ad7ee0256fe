"""Evaluation: metrics and tasks (the full harness arrives with the evaluation issue)."""
