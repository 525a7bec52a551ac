"""The PLM owner's side: the ONLY code that loads full PLM weights.

It answers context responses (keys; in process also the model's own next-token scores, over the service keys
only) and exports the output head bundle.
Nothing under ``pema.adapter`` may import this package; a test enforces it.
"""
