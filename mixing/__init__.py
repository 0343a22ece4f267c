"""What to train on: given a batch and what we believe about its labels, the inputs and soft targets.

Plain torch; no Ray, WebDataset or FAISS (docs/design.md).
"""
