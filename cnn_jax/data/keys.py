"""The keys of a batch on its way to the devices.

uint8 images [B, H, W, C], int32 labels [B] and, in evaluation, a mask [B] (0 on
padding); a stream's training batch may add the lighting shift [B, 3] (float32, in
pixel units, added on the device) and the count of unreadable files it passed over.
INDEX and EPOCH say which examples these are (host side only).
"""
IMAGE, LABEL, MASK, INDEX, EPOCH = "image", "label", "mask", "index", "epoch"
SHIFT, SKIPPED = "shift", "skipped"
TRAINING = (IMAGE, LABEL)   # what every training step receives (and SHIFT where present)
