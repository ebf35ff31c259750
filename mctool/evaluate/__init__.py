"""The evaluate stage: evaluation (train fresh networks on a synset, test on the real test split;
`mctool evaluate`) and scores (the numbers the field compares synthetic sets by).
"""
