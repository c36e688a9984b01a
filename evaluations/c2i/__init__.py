"""Class-conditional ImageNet evaluation: FID / sFID / IS / precision / recall."""
