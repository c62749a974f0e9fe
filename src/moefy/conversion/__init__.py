"""Dense FFN -> experts: neuron co-activation, grouping neurons into experts (split), making the experts equal (balance), the routers, and D2DMoE's distillation of attention projections into FFNs."""
