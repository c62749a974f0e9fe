"""Model adapters: the only code that knows how a model family lays out its FFNs, attention projections and MoE blocks (families.py names them), how models load and save, and what a task means."""
