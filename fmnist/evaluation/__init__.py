"""The evaluate stage's plain code: metrics on the fixed test set, and their plots."""
