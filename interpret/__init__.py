"""The feature interpreter stage: train it on a few labelled images, score it, write its soft labels into a bank."""
