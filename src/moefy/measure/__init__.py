"""Measurement: selection rules and the pass over the test set, FLOPs per token, paired wall-clock timing, and the machine a number was taken on."""
