"""One file per operator: Triton kernel(s), launcher, ``<op>_ref`` PyTorch reference and torch.library registration."""
