"""Per-example causal SDPA for packed rows (`lamda_edge/train/packed_attention.py`).

The loss/gradient equality of packed rows with it lives beside the block-mask case in tests/test_loss.py.
"""

import torch

from lamda_edge.train.packed_attention import (
    PACKED_SDPA,
    packed_attention,
    segment_lengths,
    supports_packed_attention,
)


def test_segments_are_cut_where_the_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert segment_lengths(positions) == [3, 2, 4]
    assert segment_lengths(torch.arange(5)[None]) == [5]
    assert segment_lengths(torch.tensor([[0, 0, 0]])) == [1, 1, 1]  # one-token examples
    assert segment_lengths(torch.tensor([[4, 5, 6, 0, 1]])) == [3, 2]  # a row need not start at 0


def test_the_hidden_states_of_a_packed_row_equal_each_example_on_its_own(tiny, tol):
    """Each example's slice of the packed row = that example run alone (no attention across examples)."""
    model = tiny.model("qwen2")  # grouped key/value heads
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (6, 3, 10)]
    row = torch.cat(examples)[None]  # (1, 19)
    positions = torch.cat([torch.arange(len(e)) for e in examples])[None]
    with packed_attention(model) as switched, torch.no_grad():
        assert switched and model.config._attn_implementation == PACKED_SDPA
        packed = model(input_ids=row, position_ids=positions).logits  # (1, 19, V)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=e[None]).logits for e in examples], dim=1)  # (1, 19, V)
    torch.testing.assert_close(packed, alone, atol=tol.fp32, rtol=1e-5)


def test_generation_with_a_cache_and_with_padding_is_unchanged_inside_the_block(tiny):
    """A KV cache or a padding mask goes to transformers' own SDPA: greedy tokens are the same inside and out."""
    model = tiny.model("llama")
    prompts = torch.tensor([[0, 0, 5, 9, 11], [7, 3, 5, 9, 11]])  # row 0 left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = model.generate(prompts, **kwargs)
    with packed_attention(model):
        got = model.generate(prompts, **kwargs)
        single = model.generate(prompts[1:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert torch.equal(single, want[1:])


def test_models_with_a_sliding_window_keep_transformers_masks(tiny):
    model = tiny.model("gemma2")  # every other layer slides over a window of 4 tokens
    assert not supports_packed_attention(model.config)
    with packed_attention(model) as switched:
        assert not switched
        assert model.config._attn_implementation != PACKED_SDPA
