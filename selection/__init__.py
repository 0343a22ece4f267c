"""Which samples can we trust, and what do we think their class is?

Plain functions over numpy arrays and scikit-learn; no Ray, WebDataset or FAISS (docs/design.md).
"""
