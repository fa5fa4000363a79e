"""Stage 2: distill the bank's teacher features into a student backbone."""
