"""ImageNet sanity on real photos: cats land in the cat classes, dogs in the dog classes."""

from __future__ import annotations

import numpy as np
import pytest

from catsdogs_efficientnet_lite import get_backbone

from conftest import REPORT, VARIANT_NAMES

N_PER_CLASS = 50
CAT_CLASSES = range(281, 286)   # tabby, tiger cat, Persian, Siamese, Egyptian cat
DOG_CLASSES = range(151, 269)   # Chihuahua ... Mexican hairless
# chance: 5/1000 of top-1 guesses fall in the cat classes, 118/1000 in the dog classes
MIN_CAT_RATE = 0.5
MIN_DOG_RATE = 0.7


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_top1_falls_in_the_right_imagenet_classes(name, imagenet_classifier, mini_images):
    size = get_backbone(name).input_size
    model = imagenet_classifier(name)
    rates = {}
    for kind, classes in (("cat", CAT_CLASSES), ("dog", DOG_CLASSES)):
        pixels = mini_images(size, kind, N_PER_CLASS)
        top1 = model.predict(pixels, batch_size=25, verbose=0)["logits"].argmax(axis=1)
        rates[kind] = float(np.isin(top1, classes).mean())
    REPORT.append(("imagenet", f"{name}: top-1 in cat classes 281-285 for {rates['cat']:.0%} of "
                               f"{N_PER_CLASS} cats (chance 0.5%), in dog classes 151-268 for "
                               f"{rates['dog']:.0%} of {N_PER_CLASS} dogs (chance 11.8%)"))
    print(REPORT[-1][1])
    assert rates["cat"] >= MIN_CAT_RATE
    assert rates["dog"] >= MIN_DOG_RATE
