"""Baselines that share PEMA's external memory and decode path (data owner's side).

- ``knn``: kNN-LM (Khandelwal et al., ICLR 2020) math: exact search, p_kNN, the scorer. Pure torch.
- ``knn_index``: builds a kNN-LM scorer from a memory folder (exact, or FAISS IVF-PQ).

Nothing here imports ``pema.owner``: the keys come from the memory on disk and, at decoding, from the owner's
context responses passed in as a ``key_source``.
"""
