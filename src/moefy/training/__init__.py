"""Training: the epoch loop both training steps share, the fine-tune recipe, precision, sparsity penalties, the MoE training objective, Sparse Upcycling and expert merging."""
