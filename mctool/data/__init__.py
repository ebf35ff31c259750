"""Real images: datasets (loaders of the named datasets and image folders, preprocessing, ZCA),
prepared (a dataset on its device, ready to train on), augment (DSA, differentiable and replayable).
"""
