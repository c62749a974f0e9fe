"""Training: the epoch loop both training steps share, the fine-tune recipe, precision, sparsity penalties, the MoE training objective, LoRA recovery, Sparse Upcycling and expert merging."""
