"""The public API for the models moefy writes: load a converted (MoEfied), upcycled or merged model
folder outside the workflow. The loaders live with the checkpoint I/O of every step
(moefy.moe.checkpoints); this module is the stable name users import them by."""

from moefy.moe.checkpoints import load_moe, load_smoe, load_sparse_moe

__all__ = ["load_moe", "load_smoe", "load_sparse_moe"]
