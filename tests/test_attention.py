"""Both forms of decode attention compute the same attention as SDPA over the visible columns."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.model.attention import decode_attention, sdpa_decode_attention


def test_both_forms_equal_sdpa_over_each_rows_visible_columns():
    g = torch.Generator().manual_seed(0)
    b, h, kv, n, hd = 3, 8, 2, 37, 16
    q, k, v = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((b, h, 1, hd), (b, kv, n, hd),
                                                                              (b, kv, n, hd)))
    k[1, :, 20:] = 1e4  # columns past a row's position must not count, whatever they hold
    pos = torch.tensor([36, 19, 0])
    ref = torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, :p + 1], v[i:i + 1, :, :p + 1],
                                                    enable_gqa=True) for i, p in enumerate(pos.tolist())])
    for form in (decode_attention, sdpa_decode_attention):
        out = form(q, k, v, pos)
        assert out.shape == q.shape and out.dtype == q.dtype
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        out = form(q.bfloat16(), k.bfloat16(), v.bfloat16(), pos)  # keeps the activation dtype
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.double(), ref, rtol=5e-2, atol=5e-2)
