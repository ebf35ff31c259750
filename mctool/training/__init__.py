"""Training networks on images: train (the one SGD loop), ensemble (R networks trained together),
labels (an expert's labels, DATM's rule, shared by distill's learned labels and evaluate's baseline).
"""
