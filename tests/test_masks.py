"""bsbr.masks.band_mask against a mask written out element by element."""

import pytest
import torch

from bsbr.masks import band_mask


@pytest.mark.parametrize("seq_len,window,sinks", [(1, 1, 0), (7, 3, 0), (9, 4, 2), (6, 10, 3), (5, 1, 5)])
def test_band_mask_matches_the_written_out_rule(seq_len, window, sinks):
    expected = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for t in range(seq_len):
        for u in range(t + 1):
            expected[t, u] = t - u < window or u < sinks
    mask = band_mask(seq_len, window, sinks)
    assert mask.shape == (1, 1, seq_len, seq_len) and mask.dtype == torch.bool
    assert torch.equal(mask[0, 0], expected)


@pytest.mark.parametrize("kwargs,name", [({"seq_len": 0, "window": 1}, "seq_len"), ({"seq_len": 4, "window": 0}, "window"),
                                         ({"seq_len": 4, "window": 2, "sinks": -1}, "sinks")])
def test_band_mask_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        band_mask(**kwargs)
