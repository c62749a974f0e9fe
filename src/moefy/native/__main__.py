"""`python -m moefy.native`: build the native looped kernel now (make's install step runs it), so
that the first study or test does not wait for the compiler; prints the kernel the CPU layers run."""

import torch

from moefy import native

print(f"moefy: looped MoE kernel on this machine: {native.implementation(torch.device('cpu'))}")
