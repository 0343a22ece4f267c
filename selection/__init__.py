"""Which samples can we trust, and what do we think their class is?

Plain functions over numpy arrays and scikit-learn; no Ray, WebDataset or FAISS (docs/design.md).
scikit-learn is imported inside the functions that call it: importing it takes ~2 CPU-s, and every Ray Train
worker imports this package (for the method's label report) while most of them never fit a fold or a GMM.
"""
