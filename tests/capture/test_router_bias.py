"""A router's correction bias must be captured even when it is all zeros at capture time.

DeepSeek-V3 initialises ``e_score_correction_bias`` to zeros, so routing with and without it
agrees on any probe; a checkpoint loaded afterwards has non-zero values. The recogniser perturbs
[E] vectors while probing so it proves the bias is used.
"""

import torch

from moec.models.hf import make_hf_model, primary_output


def test_zero_initialised_correction_bias_is_captured_and_followed():
    model, args = make_hf_model("deepseek_v3")
    compiled = torch.compile(model, backend="moec", options={"inner": "aot_eager"})
    with torch.no_grad():
        compiled(*args)  # capture while the bias is still all zeros
        biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        assert biases and all(bool((b == 0).all()) for b in biases)
        for b in biases:
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
        ref = primary_output(model(*args))
        got = primary_output(compiled(*args))
    torch.testing.assert_close(got, ref)
