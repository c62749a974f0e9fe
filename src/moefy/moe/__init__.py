"""The MoE layers: the inference layer and its kernels, the measured kernel choice, the trainable sparse layer, MC-SMoE compression, and the checkpoint I/O of every MoE a step writes."""
