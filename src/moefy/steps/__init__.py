"""One module per workflow rule, each runnable as `python -m moefy.steps.<name>` (and under torchrun)."""
