"""The data audit: suspicious training images (sizes, tiny, colour outliers, ImageNet sanity)."""
