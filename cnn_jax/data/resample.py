"""Pillow's bilinear resample (what PIL's `resize(size, BILINEAR)` and torchvision's
antialias=True compute): a triangle filter widened by the shrink factor, in Pillow's
22-bit fixed point, horizontal pass first, each pass rounded to uint8.

Pillow's loops are scalar; here each pass runs along whole rows so that the compiler
vectorises it (numba), 2-3x faster than Pillow on a crop shrunk to 224. The horizontal
pass is the same row pass on the transposed image. The result differs from Pillow's
by at most 1 (in about a third of the shapes tried with Pillow 13, which takes the
vertical pass first for some shapes); tests/test_streams.py checks it against the
installed Pillow.
"""
from __future__ import annotations

import functools

import cv2
import numba
import numpy as np

PRECISION_BITS = 22   # Pillow's 8-bit images: 32 bits less 8 for the pixel and 2 spare


@functools.lru_cache(maxsize=1024)  # per image and axis otherwise; crops repeat sizes
def coefficients(n_in: int, n_out: int) -> tuple:
    """Pillow's precompute_coeffs and normalize_coeffs_8bpc for the bilinear filter
    along one axis: (first input index [n_out], taps [n_out], int32 weights [n_out, K]),
    shared between calls: read, never written."""
    scale = n_in / n_out
    widen = max(scale, 1.0)                     # antialiasing: the filter's support
    centre = (np.arange(n_out) + 0.5) * scale
    first = np.maximum((centre - widen + 0.5).astype(np.int64), 0)   # C's (int) casts
    taps = np.minimum((centre + widen + 0.5).astype(np.int64), n_in) - first
    k = np.arange(int(np.ceil(widen)) * 2 + 1)
    w = np.maximum(0.0, 1.0 - np.abs(((k + first[:, None]) - centre[:, None] + 0.5) *
                                     (1.0 / widen)))
    w[k >= taps[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    return (first.astype(np.int32), taps.astype(np.int32),
            (0.5 + w * (1 << PRECISION_BITS)).astype(np.int32))


@numba.njit(cache=True, nogil=True)
def _resample_rows(x, first, taps, weights, out):
    """out[i] = sum_k weights[i, k] * x[first[i] + k], rounded and clipped to uint8:
    Pillow's vertical pass, along whole rows of x [rows, row length]."""
    acc = np.empty(x.shape[1], np.int32)
    for i in range(out.shape[0]):
        acc[:] = 1 << (PRECISION_BITS - 1)
        for k in range(taps[i]):
            w = weights[i, k]
            row = x[first[i] + k]
            for e in range(x.shape[1]):
                acc[e] += np.int32(row[e]) * w
        for e in range(x.shape[1]):
            v = acc[e]
            out[i, e] = 0 if v <= 0 else (255 if v >= (1 << (PRECISION_BITS + 8))
                                          else v >> PRECISION_BITS)


def _rows(img: np.ndarray, n_out: int, first, taps, weights) -> np.ndarray:
    """The row pass of img [H, W, C] to n_out rows."""
    h, w, c = img.shape
    out = np.empty((n_out, w * c), np.uint8)
    _resample_rows(np.ascontiguousarray(img).reshape(h, w * c), first, taps, weights, out)
    return out.reshape(n_out, w, c)


def _transpose(img: np.ndarray) -> np.ndarray:
    return cv2.transpose(img).reshape(img.shape[1], img.shape[0], img.shape[2])


def resample(img: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, C] (C <= 4) resized to out_hw as Pillow's bilinear resize."""
    (h, w, _), (oh, ow) = img.shape, out_hw
    first, taps, weights = coefficients(h, oh)
    if ow != w:   # horizontal pass, on the rows the vertical pass will read
        top, bottom = first[0], first[-1] + taps[-1]
        img = _transpose(_rows(_transpose(img[top:bottom]), ow, *coefficients(w, ow)))
        first = first - top
    return _rows(img, oh, first, taps, weights) if oh != h else img
