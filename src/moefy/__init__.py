"""moefy: turn the dense FFNs of a trained transformer into Mixture-of-Experts, and measure it."""

__version__ = "0.1.0"
