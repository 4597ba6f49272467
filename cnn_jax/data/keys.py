"""The keys of a batch on its way to the devices.

uint8 images [B, H, W, C], int32 labels [B] and, in evaluation, a mask [B] (0 on
padding and on files left out as unreadable); a training batch of full-size images may
add the colour shift [B, 3] (float32, in pixel units, added on the device), and where
bad images are skipped a mask [B] and the indices of the files left out (SKIPPED).
INDEX and EPOCH say which examples these are (host side only).
"""
IMAGE, LABEL, MASK, INDEX, EPOCH = "image", "label", "mask", "index", "epoch"
SHIFT, SKIPPED = "shift", "skipped"
PADDING = "padding"   # evaluation: 0 on the rows that pad the last batch
TRAINING = (IMAGE, LABEL)   # what every training step receives (and SHIFT where present)
