"""The data owner's side: output head from its bundle, the low-rank adapter, training and decoding.

Nothing here imports ``pema.owner`` (the PLM weights stay with their owner); a test enforces it.
"""
