"""Experiments that change the model beyond what its config offers (ablations of the quality
issues). They patch the product's classes inside their own process only; nothing on the product
path imports them."""
